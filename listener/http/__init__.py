"""HTTP: the app (health, stats, metrics), API_TOKEN auth, the fleet's figures, one serving loop."""
