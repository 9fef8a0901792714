"""Pipeline stages: one module each, with a config class and run(cfg)."""
