"""FLUX.1-Kontext with K reference images, the worked example of a small family (docs/guide/add-a-family.md):
`KontextFamily` adds to the in-sequence base only Kontext's stock encoding steps, the references' position
ids by ComfyUI's methods (`kontext_reference_ids`), the K-reference sampling loop and decoding."""

from .family import KONTEXT_LORA_TARGETS, KontextFamily
from .positions import REFERENCE_METHODS, kontext_reference_ids

__all__ = ["KONTEXT_LORA_TARGETS", "REFERENCE_METHODS", "KontextFamily", "kontext_reference_ids"]
