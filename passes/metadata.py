"""Every metadata key the passes, calibration, analysis, report and pipeline read or write, in one place.

Node and model keys land in ``metadata_props`` and are saved with the model, so their strings are part of
the saved format: never change a value. ``value.meta`` keys live in memory only. A prefix key is followed by
a site name (``Meta.SMOOTHED.key("layers.0.attn")``); this module imports nothing of qexport.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Meta(str, enum.Enum):
    """A metadata key; compares, hashes and formats as its string."""

    # node metadata_props
    QUANT = "qexport.quant"  # quantize/gptq on the Q/DQ nodes they insert: "weight", "per_token", "per_group", "per_tensor"
    ROLE = "qexport.role"  # linear_select on each linear before quantizing: its role name (layers.3.mlp.down)
    BIAS_CORRECTED = "qexport.bias_corrected"  # bias-correct on the linears it corrected: "1"; a rerun skips them
    ROTATE_HEADS = "qexport.rotate_heads"  # rotate-heads on each o_proj it rotated: "<rotation>:<seed>"
    ONLINE_HADAMARD = "qexport.online_hadamard"  # online-hadamard on the nodes it inserts: their op type
    LOWERED = "qexport.lowered"  # ort-int8, ort-merge-linears ("1"), ort-int4 ("int4"), ort-nbits ("int8"/"int4") on their kernels
    MERGED_LINEARS = "qexport.merged_linears"  # ort-merge-linears on a merged linear: the names it replaced, "a,b,c"
    ATTENTION = "qexport.attention"  # ort-attention on the Attention nodes it inserts: "1" (chunks copy it)
    ATTENTION_CHUNKS = "qexport.attention_chunks"  # ort-attention-chunks on the If nodes it inserts: the chunk count
    RMS_NORM = "qexport.rms_norm"  # ort-rms-norm on the RMSNormalization nodes it inserts: "1"
    ROTARY = "qexport.rotary"  # ort-rotary on the RotaryEmbedding nodes it inserts: "1"
    KV_CACHE = "qexport.kv_cache"  # quantize-kv on the Q/DQ nodes of the int8 cache: "per_channel" or "per_head"
    GQA = "qexport.gqa"  # ort-gqa on the GroupQueryAttention nodes it inserts: "1"
    SKIP_NORM = "qexport.skip_norm"  # ort-skip-norm on the SkipSimplifiedLayerNormalization nodes it inserts: "1"
    # node metadata_props prefix
    ONLINE = "qexport.online_"  # prefix of the online-transform node keys; match_linear skips such nodes
    # model metadata_props
    ROTATE_RESIDUAL = "qexport.rotate_residual"  # rotate-residual once it has rotated: "<rotation>:<seed>"
    # model metadata_props prefixes: key(site name) -> value
    SMOOTHED = "qexport.smoothed."  # smooth (and aqas) per smoothed site: fingerprint of the stats it used
    AFFINE = "qexport.affine."  # affine per fitted site: fingerprint of the windows it was fitted on
    AQAS_ALPHA = "qexport.aqas."  # aqas per site: the alpha it chose; the pipeline copies them to the manifest
    PRECISION = "qexport.precision."  # quantize-gptq with w4_fraction, per linear role: "<bits>:<4-bit rel. error>"
    # value.meta (in memory, not saved)
    ACT_CALIBRATION = "qexport.act_calibration"  # quantize: {"method", "absmax", "clip", "scale"} (ActivationScale)

    def __str__(self) -> str:
        return self.value

    def key(self, name: str) -> str:
        """The key of ``name`` under this prefix (``qexport.smoothed.`` + site name)."""
        if self not in PREFIXES:
            raise ValueError(f"{self.name} is a key, not a prefix")
        return self.value + name

    def under(self, props: Mapping[str, str]) -> dict[str, str]:
        """name -> value for every key of ``props`` under this prefix."""
        if self not in PREFIXES:
            raise ValueError(f"{self.name} is a key, not a prefix")
        return {k[len(self.value):]: v for k, v in props.items() if k.startswith(self.value)}


PREFIXES = frozenset({Meta.ONLINE, Meta.SMOOTHED, Meta.AFFINE, Meta.AQAS_ALPHA, Meta.PRECISION})
# Meta.QUANT values of the activation quantizers quantize keeps in the graph (a linear reading one is quantized)
ACTIVATION_QUANT = ("per_token", "per_group", "per_tensor")
