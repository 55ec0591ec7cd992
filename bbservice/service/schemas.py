"""The request parameters the music endpoints share, and the response documentation
(OpenAPI): the endpoints answer with JSON of these shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bbservice.service.settings import MAX_FRAMES, MAX_OUTPUTS, MAX_SEED

Mode = Literal["mean", "stochastic"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class MusicRequest(BaseModel):
    """The parameters of ``/generate`` and ``/generate_json`` (JSON, or multipart with a
    primer MIDI file)."""

    model_config = ConfigDict(title="Input")  # the schema's name, as for the other endpoints

    frames: Annotated[int, Field(ge=1, le=MAX_FRAMES, description="new frames")] = 64
    temperature: Annotated[float, Field(ge=0.05, le=10.0)] = 1.0
    seed: Seed = 0
    tempo: Annotated[float, Field(ge=20.0, le=400.0, description="quarter notes/min")] = 100.0
    num_outputs: Annotated[int, Field(ge=1, le=MAX_OUTPUTS)] = 1
    # Optional (None when not sent); BentoML 1.4 cannot take Optional[Path] file fields.
    primer: Annotated[Path, Field(description="MIDI file to continue")] = None
    mode: Mode = "mean"


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
