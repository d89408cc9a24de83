"""Dependencies as ``Annotated`` aliases, so routes read as plain signatures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from trainserve.api.runtime import Runtime


# Async on purpose: FastAPI runs a plain ``def`` dependency in a thread, a hop that every
# request (the /predict hot path included) would pay for two dictionary lookups.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back if it raises."""
    session = runtime.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": commit before the response is sent, so a client that reads right
# after a 201/202 always finds what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_who(request: Request) -> str | None:
    """The name of the API key the request came with (api/guard.py put it in the scope);
    None when the server has no key, so nobody is known."""
    user = request.scope.get("user")
    return user.display_name if user is not None and user.is_authenticated else None


# Who did it, for the records that keep that (the alias history).
WhoDep = Annotated[str | None, Depends(get_who)]
