"""The HTTP edge: app factory, routes, pydantic schemas, and the error -> status mapping."""
