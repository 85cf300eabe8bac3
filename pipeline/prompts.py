"""The prompt template: how the user's words are wrapped before they go to the image model.

A module of its own, free of I/O libraries, because the settings validate GROK3D_PROMPT_TEMPLATE with it and every
process of the service reads the settings (the TripoSR worker and BentoML's arbiter among them, which never call
xAI); pipeline/xai.py renders the prompt with it.
"""

from __future__ import annotations

DEFAULT_PROMPT_TEMPLATE = (
    "{prompt}. "
    "Show exactly one whole object, centred in the frame with space around it, nothing cropped, "
    "in a three-quarter view from slightly above, on a plain light seamless background "
    "with soft even studio lighting. No text, no logos, no other objects, no scenery."
)
PROMPT_PLACEHOLDER = "{prompt}"


def validate_prompt_template(template: str) -> str:
    """Return `template` if it can wrap a prompt; a template without `{prompt}` would drop the user's words.

    Raises ValueError (pydantic turns it into the settings' validation error)."""
    if PROMPT_PLACEHOLDER not in template:
        raise ValueError(f"The prompt template must contain {PROMPT_PLACEHOLDER}; got {template!r}.")
    return template


def render_prompt(template: str, prompt: str) -> str:
    """The user's words go in verbatim: str.replace, so braces in a prompt are never read as fields."""
    return template.replace(PROMPT_PLACEHOLDER, prompt.strip())
