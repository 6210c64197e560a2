"""HTTP and WebSocket surfaces; each only translates to calls on service.engine.Engine."""
