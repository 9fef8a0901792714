"""The API's routers, one module per group of endpoints; `hanlm.serve.api.create_app` mounts
them all. Each handler gets the shared `ServeState` through hanlm.serve.deps."""
