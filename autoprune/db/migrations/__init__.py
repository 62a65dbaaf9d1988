"""alembic environment and revisions of autoprune's own tables (shipped inside the package)."""
