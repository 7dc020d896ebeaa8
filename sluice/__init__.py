"""sluice: a multi-tenant, OpenAI-compatible LLM gateway with a serverless runtime."""
