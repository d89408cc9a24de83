"""The baseline of bench/predict.py: a bare FastAPI endpoint that answers constant JSON.

It answers what /predict answers for one row of the moons classifier, without reading the
request or computing anything: the cost of FastAPI + uvicorn alone.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()

ANSWER: dict[str, Any] = {
    "model_id": "0" * 32,
    "name": None,
    "version": None,
    "predictions": [1],
    "probabilities": [[0.0123, 0.9877]],
    "classes": [0, 1],
}


@app.post("/predict")
async def predict() -> dict[str, Any]:
    return ANSWER


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
