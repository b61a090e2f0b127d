"""How an `Answer` is spelled on the wire: Anthropic Messages or OpenAI chat completions.

Each dialect parses its request into a `Prompt` and renders answers, errors, stream frames and
response headers as bytes; the server only decides what to send and when.
"""

from fakeprovider.anthropic_dialect import AnthropicDialect
from fakeprovider.openai_dialect import OpenAIDialect
from fakeprovider.protocol import MID_STREAM_ERROR, Dialect, Frame, FrameKind

__all__ = ["MID_STREAM_ERROR", "AnthropicDialect", "Dialect", "Frame", "FrameKind", "OpenAIDialect"]
