"""Database access: engine, the embedded PostgreSQL, units of work, repositories, migrations."""
