"""`hanlm label`: a page where people rank a model's answers (rankings.jsonl, `ranked` data)."""
