"""Request and response bodies: OpenAI's shapes (so the official `openai` client works) plus our
extensions (top_k, min_p, repetition_penalty, ...; every response carries the resolved `seed` and
`parameters`). Bounds come from `settings` constants; unknown fields are refused (422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

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
# a prompt given as token ids (OpenAI's completions accept them): as many as a string's characters
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=S.MAX_PROMPT_CHARS)]


def _form(value: Any) -> str | None:
    """Which form a one-or-many field's value has: its union member's tag (None: no form)."""
    if isinstance(value, str):
        return "a-string"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, list):
        return "token-id-lists"
    if isinstance(first, int) and not isinstance(first, bool):
        return "token-ids"
    return "a-list"


def one_or_many(one: Any, many: Any, expected: str, **more: Any) -> Any:
    """A field that takes `one` value or a list of them (`many`), plus the `more` forms `_form`
    names, as a union that pydantic checks against the value's form only: a list too long is
    "at most 16 items", not "should be a valid string" (a plain union reports every member, the
    string first). The tags hold a "-" so that error locations (and messages) leave them out."""
    forms = {"a-string": one, "a-list": many, **{k.replace("_", "-"): v for k, v in more.items()}}
    return Annotated[
        Union[tuple(Annotated[t, Tag(tag)] for tag, t in forms.items())],  # noqa: UP007 (built at run time)
        Discriminator(_form, custom_error_type="invalid_type", custom_error_message=f"should be {expected}"),
    ]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictTypes(Strict):
    """The text requests: JSON types as OpenAI documents them, no coercion (`max_tokens: "5"`,
    `true` or `5.0`, `stream: "yes"` are 422 naming the field) and finite numbers only (NaN or
    Infinity is 422, not a misleading bound)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictTypes):
    include_usage: bool = False


class SamplingFields(StrictTypes):
    """Parameters shared by completions and chat (OpenAI names, then our extensions)."""

    model: ModelName
    max_tokens: int | None = Field(None, ge=0, le=S.MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=S.MAX_N)
    stop: (
        one_or_many(
            StopStr, Annotated[list[StopStr], Field(max_length=S.MAX_STOP)], "a string or a list of strings"
        )
        | None
    ) = None
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
            if not (k.isascii() and k.isdigit() and len(k) <= 20):  # (int() takes other digits too)
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
    # text, several texts, token ids (below the model's vocabulary size: checked by the route) or
    # several lists of them
    prompt: one_or_many(
        Prompt,
        Annotated[list[Prompt], Field(min_length=1, max_length=S.MAX_PROMPTS)],
        "a string, a list of strings, a list of token ids or a list of token-id lists",
        token_ids=TokenIds,
        token_id_lists=Annotated[list[TokenIds], Field(min_length=1, max_length=S.MAX_PROMPTS)],
    ) = ""
    logprobs: int | None = Field(None, ge=0, le=S.MAX_LOGPROBS)
    echo: bool = False
    # OpenAI's best_of: the n best of best_of candidates per prompt (default rank: mean log-prob)
    best_of: int | None = Field(None, ge=1, le=S.MAX_BEST_OF)
    aigc_scorer: str | None = Field(None, min_length=1, max_length=1000)  # a scorer the server allows

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: texts, or token-id lists."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class ContentPart(StrictTypes):
    type: Literal["text"]
    text: Prompt


class ImagePart(StrictTypes):
    """OpenAI's image content part: recognised so that the chat route can say that text models
    take no images (400), rather than a puzzling type error."""

    type: Literal["image_url"]
    image_url: dict[str, Any]


Part = Annotated[ContentPart | ImagePart, Field(discriminator="type")]


class ChatMessage(StrictTypes):
    role: Literal["system", "developer", "user", "assistant"]
    content: one_or_many(
        Prompt, Annotated[list[Part], Field(max_length=64)], "a string or a list of content parts"
    )
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=S.MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=0, le=S.MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=S.MAX_TOP_LOGPROBS)


class ImageRequest(Strict):
    """OpenAI's image request plus our extensions (seed, steps, guidance, label, sampler).

    `prompt`: text for a text-to-image pipeline; for a model that takes no text, empty (no prompt)
    or one of its class names (case and surrounding spaces ignored), which must agree with `label`."""

    model: ModelName
    prompt: Annotated[str, Field(max_length=4000)] | None = None
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

    @model_validator(mode="after")
    def _seeds_fit(self) -> ImageRequest:
        """Image i uses seed + i: the last one must still be <= 2**63-1 (no wrap-around)."""
        top = 2**63 - self.n
        if self.seed is not None and self.seed > top:
            raise ValueError(
                f"seed {self.seed} with n={self.n}: image i uses seed + i, so seed must be <= {top}"
            )
        return self

    def random_seed(self) -> int:
        """A seed for a request that gave none, leaving room for seed + n - 1."""
        import secrets

        return secrets.randbelow(2**63 - self.n + 1)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int  # image i of a call: seed + i, which with n=1 (and its parameters' label) makes it again
    parameters: dict[str, Any]
    moderation: dict[str, Any] | None = None  # the prompt's flag (aigc.safety), None when clean
    generation_id: int | None = None  # its id in the content store (as in generation_ids)


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int  # the request's (image i has seed + i)
    parameters: dict[str, Any]  # image 0's
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
