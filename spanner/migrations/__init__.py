"""Alembic migrations of the spanner database (env.py, versions/); run them with `spanner db upgrade`.

They are driven from spanner.storage.schema without an alembic.ini. The alembic.ini shipped here
serves development only, e.g. ``alembic -c spanner/migrations/alembic.ini revision --autogenerate -m x``
or ``alembic -c spanner/migrations/alembic.ini check`` against DATABASE_URL (or the SQLite default).
"""
