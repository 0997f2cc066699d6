"""vlmkit: build, train, serve and evaluate vision-language models and visual document retrievers.

`import vlmkit` is light: the model classes load when first asked for (`vlmkit.VLMProcessor`,
`from vlmkit import VLMForConditionalGeneration`), and with them register with transformers'
Auto factories; `import vlmkit.auto` does that alone. The command line so starts without
importing torch or transformers for commands that need neither.
"""

__version__ = "0.1.0"

_LAZY = ("VLMConfig", "VLMForConditionalGeneration", "VLMImageProcessor", "VLMProcessor")


def __getattr__(name: str):
    if name in _LAZY:
        from vlmkit import auto

        return getattr(auto, name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
