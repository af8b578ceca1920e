"""Built-in methods; importing this package registers them."""

from . import adapter, baselines, lora  # noqa: F401
