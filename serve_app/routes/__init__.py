"""HTTP routes, one module per resource; each receives the replica's Services from serve_app.deps."""
