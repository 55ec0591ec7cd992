"""Response documentation (OpenAPI); the endpoints answer with JSON of these shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Mode = Literal["mean", "stochastic"]


class ModelIdentity(BaseModel):
    name: str
    tag: str | None = Field(None, description="model store tag; null for an export folder")
    content_hash: str
    gate_family: str | None = None
    precision: str


class CaptionItem(BaseModel):
    text: str
    words: list[str]
    log_prob: float | None = None
    score: float | None = None
    finished: bool | None = None
    count: int | None = Field(None, description="stochastic: passes that gave this caption")
    frequency: float | None = None
    attention: list[list[list[float]]] | None = Field(
        None, description="per word a G x G attention map (attention=true)"
    )


class CaptionResponse(BaseModel):
    captions: list[CaptionItem]
    mode: str
    model: ModelIdentity
    params: dict[str, Any]
    seed: int
    image: dict[str, int]
    uncertainty: dict[str, float] | None = None


class MusicOutput(BaseModel):
    index: int
    frames: int
    primer_frames: int
    notes: list[dict[str, float]]
    piano_roll_png: str = Field(description="base64 PNG: time on x, pitch on y")


class MusicResponse(BaseModel):
    outputs: list[MusicOutput]
    mode: str
    model: ModelIdentity
    params: dict[str, Any]
    seed: int
    grid: dict[str, float]
