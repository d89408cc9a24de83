"""Model names, their versions and aliases: ``/models/by-name/{name}`` (thin: serving/aliases.py decides)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from trainserve.api.deps import RuntimeDep, SessionDep, WhoDep
from trainserve.api.schemas import Alias, AliasEvent, AliasRequest, Model, ModelName, ShadowAgreement
from trainserve.db import on_commit
from trainserve.errors import NotFound
from trainserve.serving import aliases, registry, shadow

router = APIRouter(tags=["models"])


@router.get("/models/by-name/{name}", response_model=ModelName)
def get_name(name: str, session: SessionDep) -> ModelName:
    """A model name's versions (newest first), aliases, and the history of alias moves (newest first)."""
    aliases.check_name(name)
    versions = registry.list_all(session=session, name=name, limit=1000)
    if not versions:
        raise NotFound(f"no model is named {name!r}")
    return ModelName(
        name=name,
        serving_version=registry.find(session=session, name=name).version or 0,
        versions=[Model.model_validate(v) for v in versions],
        aliases=[Alias.model_validate(a) for a in aliases.aliases_of(session, name)],
        history=[AliasEvent.model_validate(e) for e in aliases.history(session, name)],
    )


@router.put("/models/by-name/{name}/aliases/{alias}", response_model=Alias)
def put_alias(
    name: str, alias: str, body: AliasRequest, session: SessionDep, runtime: RuntimeDep, who: WhoDep
) -> Alias:
    """Point ``name@alias`` at a version (creating the alias), atomically, with a note kept in
    the history. ``production`` is the alias that requests naming only the model follow.
    Other API processes follow the move within TRAINSERVE_MODEL_CACHE_REVALIDATE_S. The
    history records the name of the API key used (``who``; null on a server without keys)."""
    record = aliases.set_alias(session, name, alias, body.version, note=body.note, who=who)
    on_commit(session, lambda: runtime.names.forget(name))
    return Alias.model_validate(record)


@router.delete("/models/by-name/{name}/aliases/{alias}", status_code=204)
def delete_alias(
    name: str,
    alias: str,
    session: SessionDep,
    runtime: RuntimeDep,
    who: WhoDep,
    note: str | None = Query(None, max_length=1000, description="Why: kept in the alias history"),
) -> Response:
    aliases.delete_alias(session, name, alias, note=note, who=who)
    on_commit(session, lambda: runtime.names.forget(name))
    return Response(status_code=204)


@router.get("/models/by-name/{name}/shadow", response_model=ShadowAgreement)
def shadow_agreement(name: str, session: SessionDep, runtime: RuntimeDep) -> ShadowAgreement:
    """With a ``shadow`` alias on the name, its logged requests are also answered by that
    version (after the answer went out); this compares the two over the newest pairs."""
    aliases.check_name(name)
    return ShadowAgreement.model_validate(shadow.agreement(session, name, runtime.settings.drift_window))
