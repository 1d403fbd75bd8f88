"""One router per resource; `app.create_app` mounts them (all but /health behind the API key)."""
