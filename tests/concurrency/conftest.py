"""The races run on Postgres: `pg_store` (tests/conftest.py) gives each a
migrated store on a schema of its own."""
