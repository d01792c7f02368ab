"""PostgreSQL storage: table models, engine and migrations (`db`), and the batch writer."""
