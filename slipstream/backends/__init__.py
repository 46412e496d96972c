"""EngineClient implementations the server can route to."""
