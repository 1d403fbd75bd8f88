"""Request and response bodies: OpenAI's shapes (so the official `openai` client works) plus our
extensions (top_k, min_p, repetition_penalty, ...; every response carries the resolved `seed` and
`parameters`). Bounds come from `settings` constants; unknown fields are refused (422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aigc.serve import settings as S

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=S.MAX_MODEL_NAME,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?$",
        description="a model id from GET /v1/models: `name` (newest version) or `name@version`",
    ),
]
Prompt = Annotated[str, Field(max_length=S.MAX_PROMPT_CHARS)]
StopStr = Annotated[str, Field(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Parameters shared by completions and chat (OpenAI names, then our extensions)."""

    model: ModelName
    max_tokens: int | None = Field(None, ge=0, le=S.MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=S.MAX_N)
    stop: StopStr | list[StopStr] | None = Field(None, max_length=S.MAX_STOP)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=300)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # extensions (transformers names)
    top_k: int = Field(0, ge=0, le=100_000)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    ignore_eos: bool = False
    watermark: bool = False  # green-list watermark with the deployment's key (aigc.safety)

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            if not k.isdigit():
                raise ValueError(f"logit_bias key {k!r} is not a token id (a non-negative integer string)")
        return v

    def generation_params(self, default_max_tokens: int) -> dict[str, Any]:
        """GenerationParams keyword arguments for this request."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            max_new_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            n=self.n,
            stop=stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            watermark=self.watermark,
        )


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=S.MAX_PROMPTS)] = ""
    logprobs: int | None = Field(None, ge=0, le=S.MAX_LOGPROBS)
    echo: bool = False
    # OpenAI's best_of: the n best of best_of candidates per prompt (default rank: mean log-prob)
    best_of: int | None = Field(None, ge=1, le=S.MAX_BEST_OF)
    aigc_scorer: str | None = Field(None, min_length=1, max_length=1000)  # a scorer the server allows


class ContentPart(Strict):
    type: Literal["text"]
    text: Prompt


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Prompt | Annotated[list[ContentPart], Field(max_length=64)]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=S.MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=0, le=S.MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=S.MAX_TOP_LOGPROBS)


class ImageRequest(Strict):
    """OpenAI's image request plus our extensions (seed, steps, guidance, label, sampler)."""

    model: ModelName
    prompt: Annotated[str, Field(max_length=4000)] | None = None  # text-to-image pipelines only
    n: int = Field(1, ge=1, le=S.MAX_IMAGES)
    size: Annotated[str, Field(pattern=r"^[0-9]{1,5}x[0-9]{1,5}$")] | None = None  # "WxH", square only
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=S.MAX_STEPS)
    guidance: float | None = Field(None, ge=0.0, le=S.MAX_GUIDANCE)
    label: Annotated[str, Field(max_length=100)] | int | None = None
    sampler: Literal["ddpm", "ddim", "dpm", "dpm-sde"] | None = None
    watermark: bool = False  # invisible mark of the deployment's key id (aigc.safety; >= 24 px)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    parameters: dict[str, Any]
    moderation: dict[str, Any] | None = None  # the prompt's flag (aigc.safety), None when clean


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int
    parameters: dict[str, Any]
    generation_ids: list[int | None] = []  # per image: its id in the content store


# ---------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aigc"
    kind: str  # "text" | "image"
    versions: list[str] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    seed: int | None = None
    moderation: dict[str, Any] | None = None  # {"action": "flag"|"block", "categories"} (aigc.safety)
    score: float | None = None  # best_of: this choice's score
    scores: list[float] | None = None  # best_of: every candidate's score, in seed order


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    seed: int | None
    parameters: dict[str, Any]
    warnings: list[str] = []
    generation_ids: list[int | None] = []  # per choice: its id in the content store


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    seed: int | None = None
    moderation: dict[str, Any] | None = None  # {"action": "flag"|"block", "categories"} (aigc.safety)


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    seed: int | None
    parameters: dict[str, Any]
    warnings: list[str] = []
    generation_ids: list[int | None] = []  # per choice: its id in the content store


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: str
