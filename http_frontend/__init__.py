"""The HTTP frontend: OpenAI's Images API and the web UI on Falcon and waitress. No torch."""
