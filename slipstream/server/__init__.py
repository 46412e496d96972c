"""The OpenAI-compatible HTTP server: `create_app(engine, config)` in app.py, flags in cli.py."""
