"""A local OpenAI-compatible server with OpenAI-style rate limits and injectable faults."""
