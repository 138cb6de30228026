"""Alembic environment: runs against the engine handed over by ``pacs_agent.db``."""

from alembic import context
from sqlalchemy import create_engine

from pacs_agent.db import include_in_comparison
from pacs_agent.db.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # run by the alembic command rather than by pacs_agent.db
        url = config.get_main_option("sqlalchemy.url")
        if url is None:
            raise RuntimeError("no engine handed over by pacs_agent.db and no sqlalchemy.url in the alembic config")
        engine = create_engine(url)
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=include_in_comparison,  # procrastinate's tables are its own
        )
        context.run_migrations()


run_migrations()
