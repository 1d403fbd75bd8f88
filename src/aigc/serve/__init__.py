"""The HTTP server: an OpenAI-compatible API over the models in a folder (`aigc serve`).

`app.create_app(Settings)` builds the FastAPI app; `registry` finds and loads models, `batching`
decodes concurrent text requests together, `routes/` holds one router per resource. Nothing here
does tensor work beyond driving the generation layer's decoders.
"""
