"""Hugging Face vision transformers on vitfast (`vitfast.optimize` dispatches here).

Each supported transformers class becomes a module with the same forward arguments that returns the same
output object, its transformer running as `.core`, a `vitfast.VisionTransformer` (or its distilled
variant) with timm's layout, built from the HF weights by `vitfast.checkpoint.hf_to_timm`, whose
parameters are HF's parameter tensors themselves: the packed q/k/v is built from HF's separate
projections (`layers.JoinedLinear`), and CLIP's, SigLIP's and DINOv2-with-registers' class token and
position table from HF's embeddings on each access (`VisionTransformer.derived_tensors`), so HF's tensors
get the gradients and an optimizer over either model trains both:

| transformers class | output | last_hidden_state | pooler_output / heads |
|---|---|---|---|
| ViTModel, DeiTModel | BaseModelOutputWithPooling | final norm | HF's pooler (dense + tanh) if it has one |
| ViTForImageClassification, DeiTForImageClassification | ImageClassifierOutput | | classifier(class token) |
| DeiTForImageClassificationWithTeacher | its own output | | mean of the class and distillation heads |
| Dinov2Model, Dinov2WithRegistersModel | BaseModelOutputWithPooling | final norm | class token of it |
| CLIPVisionModel | BaseModelOutputWithPooling | before the final norm | final norm of the class token |
| CLIPVisionModelWithProjection | CLIPVisionModelOutput | before the final norm | image_embeds: projection of that |
| SiglipVisionModel | BaseModelOutputWithPooling | final norm | the attention-pooling head |
| Siglip2VisionModel (NaFlex) | BaseModelOutputWithPooling | final norm | the head, padding masked (below) |
| Idefics3VisionTransformer, SmolVLMVisionTransformer | BaseModelOutput | final norm, padding masked (below) | |
| Idefics2VisionTransformer | BaseModelOutput | the same | |
| Phi4MultimodalVisionModel | BaseModelOutputWithPooling | the same | the attention-pooling head, padding masked |
| DINOv3ViTModel | BaseModelOutputWithPooling | final norm | class token of it |
| InternVLVisionModel | InternVLVisionModelOutputWithPooling | final norm (none with use_mean_pooling) | None |
| Aimv2VisionModel | BaseModelOutputWithPooling | final RMSNorm | AIMv2's attention-pooling head (`_Aimv2Head`) |
| Ovis2VisionModel | its own output | s x s token blocks joined | the visual tokenizer's probabilities |
| MLCDVisionModel | BaseModelOutputWithPooling | before the final norm | final norm of the class token |
| Dinov2Backbone, Dinov2WithRegistersBackbone, DINOv3ViTBackbone | BackboneOutput (DINOv3's) | | stage maps |

MetaClip2VisionModel and MetaClip2VisionModelWithProjection are CLIP's under other names: the same rows (the latter
returns MetaClip2VisionModelOutput); so are OWL-ViT's and OWLv2's vision models (and the vision transformer inside
them, which their two-tower models hold), whose stand-in also answers to `post_layernorm` (their detectors apply it
to every token); so are Chinese-CLIP's and AltCLIP's (ChineseCLIPVisionModel, AltCLIPVisionModel), and
CLIPSegVisionModel, whose table is resampled by default (`HFCLIPSegVisionModel`), which CLIPSegModel holds, and
CLIPSegForImageSegmentation that as `clip`. The backbones' stage feature maps: `HFBackbone`. Models that hold one of
these (CLIPModel, SiglipModel, Siglip2Model, MetaClip2Model, ChineseCLIPModel, AltCLIPModel, OwlViTModel and
Owlv2Model with their text towers, the ForImageClassification heads of CLIP, SigLIP, SigLIP 2 and DINOv2, OWL-ViT's
and OWLv2's detectors, the vision tower of LLaVA, LLaVA-NeXT, LLaVA-OneVision, VipLLaVA, Aya Vision, PaliGemma,
Gemma 3, Command A Vision, LFM2-VL and InternVL, the vision model of Idefics3, SmolVLM and DeepSeek-VL,
Phi-4-multimodal's `img_processor` inside its `model.embed_tokens_extend.image_embed`) are copied with that one
replaced
(`vitfast.convert.optimize`); they call it as they call HF's. The vision towers of Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3.5 and the Qwen2.5-Omni and Qwen3-Omni thinkers (packed patch sequences) are in `vitfast.hf_qwen`, and so are
their VLMs; Pixtral's (Pixtral-12B's, Mistral Small 3.1's and LightOnOCR's, packed images of any size) is in
`vitfast.hf_pixtral`, GLM-4V's (GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR, Qwen2-VL's packed sequences) in
`vitfast.hf_glm`, Kimi K2.5's MoonViT (packed images and video clips) in `vitfast.hf_kimi`, PaddleOCR-VL's NaViT in
`vitfast.hf_paddleocr`, ERNIE 4.5 VL's (Qwen2-VL's packed sequences) in `vitfast.hf_ernie`, Llama 4's (the class
token last, RoPE, a pixel-shuffle adapter) in `vitfast.hf_llama4`, Gemma 4's (padded patch batches, sandwich
RMSNorms, q / k / v norms, 2D RoPE, pooling; Gemma4Model and Gemma4ForConditionalGeneration hold it) in
`vitfast.hf_gemma4`, Llama 3.2 Vision's (image tiles, gated tile embeddings, a local and a gated global encoder;
MllamaModel and MllamaForConditionalGeneration hold it) in `vitfast.hf_mllama`, SAM's image encoder (windowed
blocks, relative positions in the attention's scores; SamModel, SamVisionModel and SAM-HQ's hold it, and GOT-OCR 2.0
its copy) in `vitfast.hf_sam`, SAM 3's backbone (windowed and global blocks with the axial RoPE; Sam3VisionModel
holds it, and Sam3Model and Sam3TrackerModel hold that) in `vitfast.hf_sam3`, NVIDIA's RADIO (C-RADIO; packed images
of other sizes too) in `vitfast.hf_radio`, Meta's V-JEPA 2 video encoder and classifiers (tubelets, its 3D RoPE, the
attentive pooler) in `vitfast.hf_vjepa2`, BLIP's, BLIP-2's and InstructBLIP's vision transformers (the models around
them: their `vision_model`) in `vitfast.hf_blip`, Meta's Pixio (its backbone holds it as `pixio`), I-JEPA (its
classifier holds it as `ijepa`) and MAE's encoder (ViTMAEForPreTraining holds it as `vit`) in `vitfast.hf_pixio`,
EoMT's segmentation models (a DINOv2 or DINOv3 ViT whose last blocks carry the queries, and its mask and class
heads; VidEoMT's over video) in `vitfast.hf_eomt`, Meta's Sapiens2 (its task models hold it as `model`) in
`vitfast.hf_sapiens2`, Google DeepMind's TIPSv2 (Tipsv2Model holds it as `vision_model`; its backbone, which
its DPT heads hold) in `vitfast.hf_tipsv2`, ViTPose's backbone (VitPoseForPoseEstimation holds it) in
`vitfast.hf_vitpose`, VideoMAE's video ViT (its video classifier and pretraining model hold it as `videomae`) in
`vitfast.hf_videomae`, YOLOS's ViT (its detector holds it as `vit`) in `vitfast.hf_yolos`, DPT's (its depth and
segmentation models hold it as `dpt`) in `vitfast.hf_dpt`, TimeSformer (its video classifier holds it as
`timesformer`) in `vitfast.hf_timesformer`, ViTDet's backbone (ViTMatte holds it) in `vitfast.hf_vitdet`, BEiT's
and Data2Vec-vision's (their heads hold it as `beit` / `data2vec_vision`) in `vitfast.hf_beit`, ViViT (its video
classifier holds it as `vivit`) in `vitfast.hf_vivit`, Molmo2's tower (its VLM holds it as `vision_tower`) in
`vitfast.hf_molmo2`, HunYuan-VL's (likewise) in `vitfast.hf_hunyuan_vl`, Step3p7's (its VLM holds it as
`vision_model`) in `vitfast.hf_step3p7`.
Aimv2Model and Ovis2ForConditionalGeneration are copied likewise.
AIMv2 runs with RMSNorms (`norm="rmsnorm"`, the patch tokens' too: `embed_norm`) and its SwiGLU packed; Ovis2's tower
is AIMv2's transformer and a visual tokenizer (`HFOvis2VisionModel`); MLCD is CLIP's layout with a 2D RoPE in place
of the position table (`HFMLCDVisionModel`).

Position tables for another image size follow each family's HF rule: bicubic without antialias, with
antialias for DINOv2 with registers; DINOv2 and InternVL always resample, the others when asked
(`interpolate_pos_encoding=True`); SigLIP 2 resizes its table to each image's patch grid (bilinear, antialiased;
`reference.naflex_position_table`). HF computes that resampling in float32 (DINOv2, SigLIP 2) or the model's
dtype.
DINOv2-giant's SwiGLU MLP (use_swiglu_ffn) runs as timm's packed one, its fc1 built from HF's gate and up
projections. DINOv3 has no position table: q and k of its patch tokens are rotated by its RoPE (`ops.rope_qkv`);
its gated MLP (use_gated_mlp, SiLU) runs as the packed SwiGLU too, and its key projection without bias gets a zero
bias in the packed qkv. In train mode HF moves DINOv3's RoPE coordinates at random (pos_embed_shift / jitter /
rescale), which vitfast does not: such a model runs in eval mode only. InternVL's InternViT (the 300M tower of
InternVL 2.5 / 3 / 3.5 up to 14B) is a pre-norm ViT with layer-scales (lambda_1, lambda_2) and, with
use_mean_pooling (its default), no final norm. Not supported (named in the error): InternViT-6B's RMSNorms and q /
k norms (norm_type='rms_norm', use_qk_norm), masked patches (bool_masked_pos) where the model has no mask token
(ViT, DeiT with use_mask_token, DINOv2 and DINOv3 have one: a masked patch enters as it plus its position row, as
HF's), attention masks (but SigLIP 2's patch mask), attention outputs, other activations.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.checkpoint import _HF_LAYER, _HF_LAYER_KEYS, _HF_PACKED, hf_to_timm
from vitfast.convert import _HF_INNER, BackboneAPI, UnsupportedFeatureError, _build, _Findings, _is_identity, _mlp_ratio
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_beit import CLASSES as BEIT_CLASSES
from vitfast.hf_beit import optimize_beit
from vitfast.hf_blip import CLASSES as BLIP_CLASSES
from vitfast.hf_blip import optimize_blip
from vitfast.hf_dpt import CLASSES as DPT_CLASSES
from vitfast.hf_dpt import optimize_dpt
from vitfast.hf_eomt import CLASSES as EOMT_CLASSES
from vitfast.hf_eomt import optimize_eomt
from vitfast.hf_ernie import CLASSES as ERNIE_CLASSES
from vitfast.hf_ernie import optimize_ernie
from vitfast.hf_gemma4 import CLASSES as GEMMA4_CLASSES
from vitfast.hf_gemma4 import optimize_gemma4
from vitfast.hf_glm import CLASSES as GLM_CLASSES
from vitfast.hf_glm import optimize_glm
from vitfast.hf_hunyuan_vl import CLASSES as HUNYUAN_VL_CLASSES
from vitfast.hf_hunyuan_vl import optimize_hunyuan_vl
from vitfast.hf_kimi import CLASSES as KIMI_CLASSES
from vitfast.hf_kimi import optimize_kimi
from vitfast.hf_llama4 import CLASSES as LLAMA4_CLASSES
from vitfast.hf_llama4 import optimize_llama4
from vitfast.hf_mllama import CLASSES as MLLAMA_CLASSES
from vitfast.hf_mllama import optimize_mllama
from vitfast.hf_molmo2 import CLASSES as MOLMO2_CLASSES
from vitfast.hf_molmo2 import optimize_molmo2
from vitfast.hf_paddleocr import CLASSES as PADDLEOCR_CLASSES
from vitfast.hf_paddleocr import optimize_paddleocr
from vitfast.hf_pixio import CLASSES as PIXIO_CLASSES
from vitfast.hf_pixio import optimize_pixio
from vitfast.hf_pixtral import CLASSES as PIXTRAL_CLASSES
from vitfast.hf_pixtral import optimize_pixtral
from vitfast.hf_qwen import CLASSES as QWEN_CLASSES
from vitfast.hf_qwen import kept_hidden_states, optimize_qwen
from vitfast.hf_radio import CLASSES as RADIO_CLASSES
from vitfast.hf_radio import optimize_radio
from vitfast.hf_sam import CLASSES as SAM_CLASSES
from vitfast.hf_sam import optimize_sam
from vitfast.hf_sam3 import CLASSES as SAM3_CLASSES
from vitfast.hf_sam3 import optimize_sam3
from vitfast.hf_sapiens2 import CLASSES as SAPIENS2_CLASSES
from vitfast.hf_sapiens2 import optimize_sapiens2
from vitfast.hf_step3p7 import CLASSES as STEP3P7_CLASSES
from vitfast.hf_step3p7 import optimize_step3p7
from vitfast.hf_timesformer import CLASSES as TIMESFORMER_CLASSES
from vitfast.hf_timesformer import optimize_timesformer
from vitfast.hf_tipsv2 import CLASSES as TIPSV2_CLASSES
from vitfast.hf_tipsv2 import optimize_tipsv2
from vitfast.hf_videomae import CLASSES as VIDEOMAE_CLASSES
from vitfast.hf_videomae import optimize_videomae
from vitfast.hf_vitdet import CLASSES as VITDET_CLASSES
from vitfast.hf_vitdet import optimize_vitdet
from vitfast.hf_vitpose import CLASSES as VITPOSE_CLASSES
from vitfast.hf_vitpose import optimize_vitpose
from vitfast.hf_vivit import CLASSES as VIVIT_CLASSES
from vitfast.hf_vivit import optimize_vivit
from vitfast.hf_vjepa2 import CLASSES as VJEPA2_CLASSES
from vitfast.hf_vjepa2 import optimize_vjepa2
from vitfast.hf_yolos import CLASSES as YOLOS_CLASSES
from vitfast.hf_yolos import optimize_yolos
from vitfast.layers import JoinedLinear
from vitfast.model import VisionTransformer, VisionTransformerDistilled
from vitfast.reference import (
    check_image_size,
    crop_to_patches,
    idefics3_position_ids,
    naflex_position_table,
    qwen_rope_tables,
    resample_pos_embed,
    to_2tuple,
)

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "quick_gelu": "quick_gelu"}

# transformers class -> (family, head): the family fixes the layout and outputs of the base model,
# the head what a head model adds; "base" is the attribute of a head model holding its base model.
CLASSES = {
    "ViTModel": ("vit", None), "ViTForImageClassification": ("vit", "classifier"),
    "DeiTModel": ("deit", None), "DeiTForImageClassification": ("deit", "classifier"),
    "DeiTForImageClassificationWithTeacher": ("deit", "teacher"),
    "Dinov2Model": ("dinov2", None), "Dinov2WithRegistersModel": ("dinov2_reg", None),
    "CLIPVisionModel": ("clip", None), "CLIPVisionModelWithProjection": ("clip", "projection"),
    "MetaClip2VisionModel": ("clip", None), "MetaClip2VisionModelWithProjection": ("clip", "projection"),
    # OWL-ViT / OWLv2: CLIP's vision transformer (pre_layernorm); their detectors hold the transformer itself
    "OwlViTVisionModel": ("clip", None), "OwlViTVisionTransformer": ("clip", None),
    "Owlv2VisionModel": ("clip", None), "Owlv2VisionTransformer": ("clip", None),
    "CLIPSegVisionModel": ("clip", None), "ChineseCLIPVisionModel": ("clip", None),
    "AltCLIPVisionModel": ("clip", None),
    # GIT's CLIP vision model (GitModel holds it as `image_encoder`): CLIP's layout, post_layernorm on every token
    "GitVisionModel": ("git", None),
    # Kosmos-2's CLIP vision transformer (Kosmos2VisionModel holds it as `model`, Kosmos-2's models that as
    # `vision_model`; they apply its post_layernorm to every token themselves)
    "Kosmos2VisionTransformer": ("clip", None),
    "SiglipVisionModel": ("siglip", None),
    "Siglip2VisionModel": ("siglip2", None),          # NaFlex: patchified, padded sequences (HFSiglip2VisionModel)
    # Idefics3's and SmolVLM's SigLIP with a patch mask and bucketed positions (HFIdefics3VisionTransformer)
    "Idefics3VisionTransformer": ("idefics3", None), "SmolVLMVisionTransformer": ("idefics3", None),
    "Idefics2VisionTransformer": ("idefics3", None),
    # Phi-4-multimodal's SigLIP: Idefics3's patch mask and bucketed positions, with the attention-pooling head
    "Phi4MultimodalVisionModel": ("phi4mm", None),
    "DINOv3ViTModel": ("dinov3", None),
    # InternVL's InternViT (InternVL 2.5 / 3 / 3.5 up to 14B: the 300M tower): LayerNorm, layer-scale, no final norm
    "InternVLVisionModel": ("internvl", None),
    # AIMv2 (Apple): RMSNorms (the patch tokens' too), the SwiGLU MLP, its own attention-pooling head
    "Aimv2VisionModel": ("aimv2", None),
    # Ovis2's tower: AIMv2's transformer, then its visual tokenizer (HFOvis2VisionModel)
    "Ovis2VisionModel": ("ovis2", None),
    # MLCD (DeepGlint's): CLIP's layout with 2D RoPE instead of a position table (HFMLCDVisionModel)
    "MLCDVisionModel": ("mlcd", None),
    # the backbones of depth / segmentation models (Depth Anything, DPT): stage feature maps
    "Dinov2Backbone": ("dinov2", "backbone"), "Dinov2WithRegistersBackbone": ("dinov2_reg", "backbone"),
    "DINOv3ViTBackbone": ("dinov3", "backbone"),
    # the Qwen-VL towers (Qwen2-VL to Qwen3.5, the Omni thinkers') over packed patch sequences (vitfast.hf_qwen)
    **{name: (family, None) for name, family in QWEN_CLASSES.items()},
    # Pixtral's encoder (Pixtral-12B, Mistral Small 3.1 / 3.2) over packed images of any size (vitfast.hf_pixtral)
    **{name: (family, None) for name, family in PIXTRAL_CLASSES.items()},
    # GLM-4V's tower (GLM-4.1V, GLM-4.5V, GLM-4.6V, GLM-OCR) over Qwen2-VL's packed patch sequences (vitfast.hf_glm)
    **{name: (family, None) for name, family in GLM_CLASSES.items()},
    # Kimi K2.5's MoonViT over packed patches of images and videos (vitfast.hf_kimi)
    **{name: (family, None) for name, family in KIMI_CLASSES.items()},
    # PaddleOCR-VL's NaViT over packed patches of images (vitfast.hf_paddleocr)
    **{name: (family, None) for name, family in PADDLEOCR_CLASSES.items()},
    # ERNIE 4.5 VL's tower over Qwen2-VL's packed patch sequences (vitfast.hf_ernie)
    **{name: (family, None) for name, family in ERNIE_CLASSES.items()},
    # Llama 4's tower (Scout, Maverick): the class token last, 2D RoPE, the pixel-shuffle adapter (vitfast.hf_llama4)
    **{name: (family, None) for name, family in LLAMA4_CLASSES.items()},
    # Gemma 4's tower: padded patch batches, sandwich RMSNorms, q / k / v norms, 2D RoPE, pooling (vitfast.hf_gemma4)
    **{name: (family, None) for name, family in GEMMA4_CLASSES.items()},
    # Llama 3.2 Vision's tower: image tiles, gated tile embeddings, a local and a gated global encoder
    # (vitfast.hf_mllama)
    **{name: (family, None) for name, family in MLLAMA_CLASSES.items()},
    # SAM's image encoder (SamModel, SamVisionModel) and GOT-OCR 2.0's copy of it: windowed blocks, relative positions
    # in the attention's scores, the neck (vitfast.hf_sam)
    **{name: (family, None) for name, family in SAM_CLASSES.items()},
    # SAM 3's backbone (Sam3VisionModel's, which Sam3Model and Sam3TrackerModel hold): windowed and global blocks with
    # the axial RoPE (vitfast.hf_sam3)
    **{name: (family, None) for name, family in SAM3_CLASSES.items()},
    # NVIDIA's RADIO (C-RADIO v3 / v4; Nemotron 3 Nano Omni's vision model): class and register tokens, the Cropped
    # Position Embedding, layer-scales, images packed by image_grid_hw (vitfast.hf_radio)
    **{name: (family, None) for name, family in RADIO_CLASSES.items()},
    # Meta's V-JEPA 2 video encoder and its video classifiers: tubelets, the 3D RoPE, the attentive pooler
    # (vitfast.hf_vjepa2)
    **{name: (family, None) for name, family in VJEPA2_CLASSES.items()},
    # BLIP's and BLIP-2's (InstructBLIP's) vision transformers: packed qkv, the final norm twice on the pooled row
    # (vitfast.hf_blip)
    **{name: (family, None) for name, family in BLIP_CLASSES.items()},
    # Meta's Pixio (8 class tokens with position rows, the pooler as their mean; PixioBackbone holds it), I-JEPA
    # (no class token; IJepaForImageClassification holds it) and MAE's encoder (HF's masking) (vitfast.hf_pixio)
    **{name: (family, None) for name, family in PIXIO_CLASSES.items()},
    # EoMT (and EoMT-DINOv3): a DINOv2 / DINOv3 ViT whose last blocks carry segmentation queries, its mask and class
    # heads (vitfast.hf_eomt)
    **{name: (family, None) for name, family in EOMT_CLASSES.items()},
    # Meta's Sapiens2 (its task models hold it as `model`): RMSNorms, grouped-query blocks, q / k norms, DINOv3's RoPE
    # (vitfast.hf_sapiens2)
    **{name: (family, None) for name, family in SAPIENS2_CLASSES.items()},
    # Google DeepMind's TIPSv2 (Tipsv2Model holds it as `vision_model`): DINOv2's layout with registers, bilinear
    # resampling of its table, the mask token (vitfast.hf_tipsv2)
    **{name: (family, None) for name, family in TIPSV2_CLASSES.items()},
    # ViTPose's and ViTPose++'s backbone (VitPoseForPoseEstimation holds it): the padded patch convolution, the
    # mixture-of-experts MLPs (vitfast.hf_vitpose)
    **{name: (family, None) for name, family in VITPOSE_CLASSES.items()},
    # VideoMAE's video ViT (its classifier and pretraining model hold it as `videomae`): tubelets, the sinusoid table,
    # masked tokens dropped (vitfast.hf_videomae)
    **{name: (family, None) for name, family in VIDEOMAE_CLASSES.items()},
    # YOLOS's ViT (YolosForObjectDetection holds it as `vit`): detection tokens after the patches, the tables resampled
    # to every image size, the mid position tables (vitfast.hf_yolos)
    **{name: (family, None) for name, family in YOLOS_CLASSES.items()},
    # DPT's ViT (DPT-Large, DPT-Hybrid; its depth and segmentation models hold it as `dpt`): the table resized to every
    # image size (vitfast.hf_dpt)
    **{name: (family, None) for name, family in DPT_CLASSES.items()},
    # TimeSformer (its video classifier holds it as `timesformer`): divided space-time attention
    # (vitfast.hf_timesformer)
    **{name: (family, None) for name, family in TIMESFORMER_CLASSES.items()},
    # ViTDet's backbone (ViTMatte holds it as `backbone`): SAM's windowed blocks with relative positions, residual conv
    # blocks (vitfast.hf_vitdet)
    **{name: (family, None) for name, family in VITDET_CLASSES.items()},
    # BEiT's ViT (BEiT, BEiT v2, DiT; its classifier, masked-image model, segmenter and backbone hold it as `beit`) and
    # Data2Vec-vision's copy (`data2vec_vision`): the relative position bias in the attention kernel (vitfast.hf_beit)
    **{name: (family, None) for name, family in BEIT_CLASSES.items()},
    # ViViT (its video classifier holds it as `vivit`): tubelets, spatio-temporal attention (vitfast.hf_vivit)
    **{name: (family, None) for name, family in VIVIT_CLASSES.items()},
    # Molmo2's tower (its VLM holds it as `vision_tower`): a SigLIP-style ViT over patchified crops (vitfast.hf_molmo2)
    **{name: (family, None) for name, family in MOLMO2_CLASSES.items()},
    # HunYuan-VL's tower (its VLM holds it as `vision_tower`): a NaViT over packed patches with grid_thw, its patch
    # merger per image (vitfast.hf_hunyuan_vl)
    **{name: (family, None) for name, family in HUNYUAN_VL_CLASSES.items()},
    # Step3p7's tower (its VLM holds it as `vision_model`): 2D RoPE, layer-scales, two downsampling convolutions
    # (vitfast.hf_step3p7)
    **{name: (family, None) for name, family in STEP3P7_CLASSES.items()},
}
_BASE_ATTR = {"vit": "vit", "deit": "deit"}
# family -> (resample with antialias, resample whenever the grid differs)
_POS_RULE = {"vit": (False, False), "deit": (False, False), "dinov2": (False, True), "dinov2_reg": (True, True),
             "clip": (False, False), "git": (False, False), "siglip": (False, False), "dinov3": (False, False),
             "internvl": (False, True), "aimv2": (False, False), "ovis2": (False, False), "mlcd": (False, False)}


def optimize_hf(model: nn.Module) -> nn.Module:
    """A transformers vision model (one of CLASSES) -> its stand-in on vitfast (module docstring), which answers to
    HF's `main_input_name` (the models around it read it: VisionEncoderDecoderModel's generate)."""
    out = _optimize_hf(model)
    if "main_input_name" not in vars(type(out)):
        out.main_input_name = getattr(model, "main_input_name", "pixel_values")
    return out


def _optimize_hf(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if name not in CLASSES:
        held = [f"{type(m).__name__} ({attr})" for attr in _HF_INNER if isinstance(m := model._modules.get(attr),
                                                                                   nn.Module)]
        raise UnsupportedFeatureError(
            f"model: Hugging Face {name}{' holding ' + ', '.join(held) if held else ''} is not supported (supported: "
            f"{sorted(CLASSES)}, and models holding one as {', '.join(_HF_INNER)} or inside model)")
    family, head = CLASSES[name]
    if family.startswith("qwen"):
        return optimize_qwen(model)
    if family == "pixtral":
        return optimize_pixtral(model)
    if family == "glm4v":
        return optimize_glm(model)
    if family == "kimi_k25":
        return optimize_kimi(model)
    if family == "paddleocr_vl":
        return optimize_paddleocr(model)
    if family == "ernie4_5_vl":
        return optimize_ernie(model)
    if family == "llama4":
        return optimize_llama4(model)
    if family == "gemma4":
        return optimize_gemma4(model)
    if family == "mllama":
        return optimize_mllama(model)
    if family == "sam":
        return optimize_sam(model)
    if family == "sam3":
        return optimize_sam3(model)
    if family == "radio":
        return optimize_radio(model)
    if family == "vjepa2":
        return optimize_vjepa2(model)
    if family == "blip":
        return optimize_blip(model)
    if family == "pixio":
        return optimize_pixio(model)
    if family == "eomt":
        return optimize_eomt(model)
    if family == "sapiens2":
        return optimize_sapiens2(model)
    if family == "tipsv2":
        return optimize_tipsv2(model)
    if family == "vitpose":
        return optimize_vitpose(model)
    if family == "videomae":
        return optimize_videomae(model)
    if family == "yolos":
        return optimize_yolos(model)
    if family == "dpt":
        return optimize_dpt(model)
    if family == "timesformer":
        return optimize_timesformer(model)
    if family == "vitdet":
        return optimize_vitdet(model)
    if family == "beit":
        return optimize_beit(model)
    if family == "vivit":
        return optimize_vivit(model)
    if family == "molmo2":
        return optimize_molmo2(model)
    if family == "hunyuan_vl":
        return optimize_hunyuan_vl(model)
    if family == "step3p7":
        return optimize_step3p7(model)
    cfg = model.config
    f = _Findings(f"Hugging Face {name}")
    base = getattr(model, _BASE_ATTR[family]) if head in ("classifier", "teacher") else model
    base = getattr(base, "vision_model", base)              # CLIP / SigLIP before transformers 5.x nest it
    if family == "ovis2":                                   # its transformer is AIMv2's; the tokenizer runs after
        base = model.transformer
        f.need(cfg.tokenize_function in ("softmax", "st_argmax"),
               f"tokenize_function={cfg.tokenize_function!r} (only 'softmax' and 'st_argmax': Gumbel noise is random)")
        f.linear(model.head_linear, "head_linear", bias=False)
        f.layer_norm_eps(model.head_norm, "head_norm", model.head_linear.out_features)
    core_cfg = _core_config(cfg, family, f)
    if family.startswith("siglip") and not getattr(cfg, "vision_use_head", True) or family == "idefics3":
        core_cfg["global_pool"] = ""
    heads = {"classifier": ("classifier",), "teacher": ("cls_classifier", "distillation_classifier")}.get(head, ())
    for h in heads:
        if not _is_identity(getattr(model, h)):
            f.linear(getattr(model, h), h)
    if head == "projection":
        f.need(isinstance(model.visual_projection, nn.Linear), "visual_projection (expected nn.Linear)")
    if family == "aimv2" and getattr(base, "head", None) is not None:
        for name in ("k_proj", "v_proj", "output_proj"):
            f.linear(getattr(base.head, name, None), f"head.{name}", bias=False)
    f.check(False)                          # unsupported features first: their weights would not map
    hf_state = base.state_dict(keep_vars=True)
    if family == "aimv2":                   # its pooling head runs as _Aimv2Head on HF's modules
        hf_state = {k: v for k, v in hf_state.items() if not k.startswith("head.")}
    if family == "mlcd":                    # the class token's RoPE angle: HFMLCDVisionModel's tables
        hf_state = {k: v for k, v in hf_state.items() if k != "class_pos_emb"}
    state = {k: v for k, v in hf_to_timm(hf_state).items() if not k.startswith(("head.", "head_dist."))}
    if family == "siglip2":                 # nn.Linear over patches flattened as (row, column, channel)
        P = core_cfg["patch_size"]
        state["patch_embed.proj.weight"] = _PatchesAsConv.conv_view(state["patch_embed.proj.weight"], P,
                                                                    core_cfg["in_chans"])
    core = _build(core_cfg, state, model, f, VisionTransformerDistilled if family == "deit" else VisionTransformer)
    _join_projections(core, base)
    _derive_embeddings(core, base, family)
    if family == "siglip2":
        core.patch_embed.proj = _PatchesAsConv(base.embeddings.patch_embedding, core_cfg["in_chans"],
                                               core_cfg["patch_size"])
        return HFSiglip2VisionModel(cfg, core, family).train(model.training)
    if family in ("idefics3", "phi4mm"):
        return HFIdefics3VisionTransformer(cfg, core, family).train(model.training)
    output = sys.modules[type(base).__module__].InternVLVisionModelOutputWithPooling if family == "internvl" else None
    if family == "git":
        output = sys.modules[type(base).__module__].BaseModelOutput
    if family == "mlcd":
        return HFMLCDVisionModel(cfg, core, family, None, output, model.class_pos_emb,
                                 model.vision_rotary_embedding.inv_freq).train(model.training)
    pooler = getattr(base, "pooler", None)
    if family == "aimv2":
        pooler = _Aimv2Head(base.head) if getattr(base, "head", None) is not None else None
    mask_token = getattr(base.embeddings, "mask_token", None) if family in ("vit", "deit", "dinov2", "dinov2_reg",
                                                                            "dinov3") else None
    stand_in = HFCLIPSegVisionModel if name == "CLIPSegVisionModel" else HFVisionModel
    vision = stand_in(cfg, core, family, pooler, output, mask_token).train(model.training)
    if family == "ovis2":
        hf_module = sys.modules[type(model).__module__]
        return HFOvis2VisionModel(cfg, vision, model.head_linear, model.head_norm,
                                  hf_module.BaseModelOutputWithVisualIndicatorFeatures).train(model.training)
    if head is None:
        return vision
    if head == "backbone":
        return HFBackbone(cfg, vision, model.stage_names).train(model.training)
    if head == "projection":
        output = getattr(sys.modules[type(model).__module__], name.replace("WithProjection", "Output"))
        return HFCLIPVisionWithProjection(cfg, vision, model.visual_projection, output).train(model.training)
    if head == "teacher":
        return HFDeiTWithTeacher(cfg, vision, model.cls_classifier,
                                 model.distillation_classifier).train(model.training)
    return HFImageClassifier(cfg, vision, model.classifier, getattr(model, "loss_function", None),
                             _BASE_ATTR[family]).train(model.training)


def _join_projections(core: VisionTransformer, base: nn.Module) -> None:
    """Point each block's packed qkv at HF's own q / k / v projections (and DINOv2-giant's packed fc1 at its
    gate and up projections), and SigLIP's pooling-head q / kv at the rows of its packed in_proj
    (`JoinedLinear`): the converted model trains HF's parameters, and the copies `hf_to_timm` made for
    `_build` are dropped."""
    parts: dict[tuple[int, str], list] = {}
    for key, _ in base.named_parameters():
        m = _HF_LAYER.match(key)
        stem, _, param = m.group(2).rpartition(".") if m else ("", "", "")
        target, slot = _HF_LAYER_KEYS.get(stem, (None, None))
        if slot is not None and param == "weight":
            parts.setdefault((int(m.group(1)), target), [None] * len(_HF_PACKED[target]))[slot] = \
                base.get_submodule(key.rpartition(".")[0])
    for (idx, target), modules in parts.items():
        parent, _, name = target.rpartition(".")
        setattr(core.blocks[idx].get_submodule(parent), name,                 # (DINOv3's plain MLP: up_proj alone)
                JoinedLinear([(mod, "weight", "bias", None) for mod in modules if mod is not None]))
    pool = getattr(base, "head", None)
    if core.attn_pool is not None and isinstance(getattr(pool, "attention", None), nn.MultiheadAttention):
        mha, dim = pool.attention, pool.attention.embed_dim
        core.attn_pool.q = JoinedLinear([(mha, "in_proj_weight", "in_proj_bias", slice(0, dim))])
        core.attn_pool.kv = JoinedLinear([(mha, "in_proj_weight", "in_proj_bias", slice(dim, 3 * dim))])


# The class token and position table in timm's layout, built from HF's embedding tensors on each access
# (`VisionTransformer.derived_tensors`): views, or for DINOv2 with registers one small sum.
def _class_embedding(core):                    # CLIP: [D] -> [1, 1, D]
    return core.hf_embeddings.class_embedding.view(1, 1, -1)


def _position_embedding(core):                 # CLIP / SigLIP: nn.Embedding [T, D] -> [1, T, D]
    return core.hf_embeddings.position_embedding.weight.unsqueeze(0)


def _registers_class_token(core):              # DINOv2 with registers: the class token plus its position row
    e = core.hf_embeddings
    return e.cls_token + e.position_embeddings[:, :1]


def _registers_position_table(core):           # ... and the patches' rows (the registers have none)
    return core.hf_embeddings.position_embeddings[:, 1:]


_DERIVED = {"clip": {"cls_token": _class_embedding, "pos_embed": _position_embedding},
            "git": {"cls_token": _class_embedding, "pos_embed": _position_embedding},
            "siglip": {"pos_embed": _position_embedding}, "aimv2": {"pos_embed": _position_embedding},
            "ovis2": {"pos_embed": _position_embedding}, "mlcd": {"cls_token": _class_embedding},
            "siglip2": {"pos_embed": _position_embedding},
            "idefics3": {"pos_embed": _position_embedding}, "phi4mm": {"pos_embed": _position_embedding},
            "dinov2_reg": {"cls_token": _registers_class_token, "pos_embed": _registers_position_table}}


def _derive_embeddings(core: VisionTransformer, base: nn.Module, family: str) -> None:
    """Replace the class token / position table that `_build` made from reshaped views or a sum of HF's
    tensors with ones built from HF's embedding module on each access, which becomes a submodule of `core`:
    HF's tensors are then the parameters (an optimizer over either model trains them, and gradients reach
    them)."""
    derived = _DERIVED.get(family, {})
    if not derived:
        return
    core.hf_embeddings = base.embeddings
    for name in derived:
        delattr(core, name)
    core.derived_tensors = dict(derived)


def _core_config(cfg, family: str, f: _Findings) -> dict:
    """The vitfast ViT's kwargs for a HF config; unsupported options go to `f`."""
    if family == "dinov3":
        return _dinov3_config(cfg, f)
    if family in ("aimv2", "ovis2"):
        return _aimv2_config(cfg, f)
    act = _HF_ACTIVATIONS.get(cfg.hidden_act) if isinstance(cfg.hidden_act, str) else None
    f.need(act is not None, f"hidden_act={cfg.hidden_act!r} (only {sorted(_HF_ACTIVATIONS)})")
    heads, dim = cfg.num_attention_heads, cfg.hidden_size
    image_size = cfg.image_size if family != "siglip2" else int(cfg.num_patches ** 0.5) * cfg.patch_size
    if family == "siglip2":
        f.need(int(cfg.num_patches ** 0.5) ** 2 == cfg.num_patches,
               f"num_patches={cfg.num_patches} (the position table is a square grid)")
    f.need(getattr(cfg, "head_dim", None) in (None, dim // heads) and dim % heads == 0,
           f"head_dim={getattr(cfg, 'head_dim', None)} with hidden_size={dim}, num_attention_heads={heads}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "projection_dropout",
                 "drop_path_rate"):
        if isinstance(getattr(cfg, name, None), (int, float)):
            f.dropout(getattr(cfg, name), name)
    swiglu = family.startswith("dinov2") and bool(getattr(cfg, "use_swiglu_ffn", False))
    if swiglu:                 # Dinov2SwiGLUFFN: two thirds of the width, rounded up to 8, for gate and up each
        hidden = 2 * ((int(int(dim * cfg.mlp_ratio) * 2 / 3) + 7) // 8 * 8)
    elif family.startswith("dinov2"):
        hidden = int(dim * cfg.mlp_ratio)
    else:
        hidden = cfg.intermediate_size
    siglip = family.startswith("siglip") or family in ("idefics3", "phi4mm")  # no class token, SigLIP's layout
    out = dict(img_size=to_2tuple(image_size), patch_size=to_2tuple(cfg.patch_size), in_chans=cfg.num_channels,
               num_classes=0, embed_dim=dim, depth=cfg.num_hidden_layers, num_heads=heads,
               mlp_ratio=_mlp_ratio(hidden, dim), qkv_bias=bool(getattr(cfg, "qkv_bias", True)),
               act_layer=act or "gelu", norm_eps=cfg.layer_norm_eps, class_token=not siglip,
               global_pool="map" if siglip else "token", mlp_layer="swiglu" if swiglu else "mlp")
    if family.startswith("dinov2"):
        out.update(init_values=1.0, dynamic_img_size=True)        # the gammas come from the weights
    if family == "dinov2_reg":
        out.update(reg_tokens=cfg.num_register_tokens, no_embed_class=True)
    if family in ("clip", "git"):
        out.update(pre_norm=True)
    if family == "mlcd":                # CLIP's layout, no position table: RoPE made for any patch grid
        f.need(getattr(cfg, "num_key_value_groups", 1) == 1,
               f"num_key_value_groups={getattr(cfg, 'num_key_value_groups', None)} (grouped-query attention)")
        rope = getattr(cfg, "rope_parameters", None) or {}
        f.need(rope.get("rope_type", "axial") == "axial", f"rope_type={rope.get('rope_type')!r} (only 'axial')")
        f.need((dim // heads) % 4 == 0, f"head dim {dim // heads} (MLCD's 2D RoPE needs a multiple of 4)")
        out.update(pre_norm=True, pos_embed="none", dynamic_img_size=True)
    if family == "internvl":
        f.need(not getattr(cfg, "use_qk_norm", False), "use_qk_norm=True (RMSNorms over q and k: InternViT-6B's)")
        f.need(getattr(cfg, "norm_type", "layer_norm") == "layer_norm",
               f"norm_type={getattr(cfg, 'norm_type', None)!r} (only 'layer_norm')")
        f.need(getattr(cfg, "use_absolute_position_embeddings", True), "use_absolute_position_embeddings=False")
        # the gammas come from the weights; the position table resized to any grid; no final norm with mean pooling
        out.update(qkv_bias=bool(cfg.attention_bias), init_values=1.0, dynamic_img_size=True,
                   final_norm=not cfg.use_mean_pooling)
    return out


def _dinov3_config(cfg, f: _Findings) -> dict:
    """DINOv3ViTConfig -> the vitfast ViT's kwargs: no position table, RoPE on the patch tokens, registers,
    layer-scale, the plain MLP (GELU family) or the gated one (use_gated_mlp with SiLU: timm's packed SwiGLU,
    fc1 = [gate_proj | up_proj]). A k, q or v without bias gets a zero bias in the packed qkv."""
    heads, dim = cfg.num_attention_heads, cfg.hidden_size
    f.need(dim % heads == 0 and (dim // heads) % 4 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (RoPE needs a head dim divisible by 4)")
    gated = bool(getattr(cfg, "use_gated_mlp", False))
    act = _HF_ACTIVATIONS.get(cfg.hidden_act) if isinstance(cfg.hidden_act, str) else None
    if gated:
        f.need(cfg.hidden_act == "silu", f"use_gated_mlp with hidden_act={cfg.hidden_act!r} (only 'silu')")
    else:
        f.need(act is not None, f"hidden_act={cfg.hidden_act!r} (only {sorted(_HF_ACTIVATIONS)})")
    f.need(bool(getattr(cfg, "proj_bias", True)), "proj_bias=False (an output projection without bias)")
    f.need(bool(getattr(cfg, "mlp_bias", True)), "mlp_bias=False (MLP projections without bias)")
    for name in ("attention_dropout", "drop_path_rate"):
        if isinstance(getattr(cfg, name, None), (int, float)):
            f.dropout(getattr(cfg, name), name)
    augment = {n: getattr(cfg, f"pos_embed_{n}", None) for n in ("shift", "jitter", "rescale")}
    augment = [f"pos_embed_{n}={v!r}" for n, v in augment.items() if v is not None]
    if augment:
        f.train_only.append(f"RoPE coordinate augmentation ({', '.join(augment)})")
    hidden = 2 * cfg.intermediate_size if gated else cfg.intermediate_size
    return dict(img_size=to_2tuple(cfg.image_size), patch_size=to_2tuple(cfg.patch_size), in_chans=cfg.num_channels,
                num_classes=0, embed_dim=dim, depth=cfg.num_hidden_layers, num_heads=heads,
                mlp_ratio=_mlp_ratio(hidden, dim), act_layer=act or "gelu", norm_eps=cfg.layer_norm_eps,
                qkv_bias=any(bool(getattr(cfg, f"{n}_bias", True)) for n in ("query", "key", "value")),
                mlp_layer="swiglu" if gated else "mlp", init_values=1.0, dynamic_img_size=True,
                reg_tokens=int(getattr(cfg, "num_register_tokens", 0)), pos_embed="none", rope="dinov3",
                rope_temperature=float(cfg.rope_theta))


def _aimv2_config(cfg, f: _Findings) -> dict:
    """Aimv2VisionConfig -> the vitfast ViT's kwargs: RMSNorms (the patch tokens' too, before the position table),
    the SwiGLU MLP (gate and up as the packed fc1), no class token; out_proj's bias follows qkv_bias and the MLP's
    mlp_bias (vitfast's proj_bias covers both: they must agree). The pooling head runs apart (`_Aimv2Head`)."""
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act == "silu", f"hidden_act={cfg.hidden_act!r} (only 'silu', the SwiGLU)")
    f.need(not getattr(cfg, "is_native", False), "is_native=True (2D sin-cos positions made for each image size)")
    qkv_bias, mlp_bias = bool(cfg.qkv_bias), bool(cfg.mlp_bias)
    f.need(qkv_bias == mlp_bias, f"qkv_bias={qkv_bias} with mlp_bias={mlp_bias} (only both or neither)")
    if isinstance(getattr(cfg, "attention_dropout", None), (int, float)):
        f.dropout(cfg.attention_dropout, "attention_dropout")
    return dict(img_size=to_2tuple(cfg.image_size), patch_size=to_2tuple(cfg.patch_size), in_chans=cfg.num_channels,
                num_classes=0, embed_dim=dim, depth=cfg.num_hidden_layers, num_heads=heads,
                mlp_ratio=_mlp_ratio(2 * cfg.intermediate_size, dim), qkv_bias=qkv_bias, proj_bias=qkv_bias,
                norm_eps=cfg.rms_norm_eps, class_token=False, global_pool="", mlp_layer="swiglu", norm="rmsnorm",
                embed_norm=True)


class _Aimv2Head(nn.Module):
    """AIMv2's attention-pooling head on vitfast ops (HF's modules: the learned query `cls_token`, k_proj and v_proj
    joined as one kv GEMM, output_proj): the query against every token through the attention kernel, then the
    projection -> [B, D]."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.num_heads, self.cls_token, self.output_proj = head.num_heads, head.cls_token, head.output_proj
        self.kv = JoinedLinear([(head.k_proj, "weight", "bias", None), (head.v_proj, "weight", "bias", None)])

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        H = self.num_heads
        kv = ops.linear(x, self.kv.weight, self.kv.bias)                                      # (B, N, 2D)
        k, v = kv.view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)                  # (B, H, N, Dh) views
        q = self.cls_token.to(x.dtype).reshape(1, H, 1, D // H).expand(B, H, 1, D // H).contiguous()
        out = ops.attention(q, k, v, scale=(D // H) ** -0.5)                                  # (B, H, 1, Dh)
        return ops.linear(out.transpose(1, 2).reshape(B, D), self.output_proj.weight, self.output_proj.bias)


_GENERATION_ARGUMENTS: frozenset[str] | None = None


def _generation_arguments() -> frozenset[str]:
    """The arguments of transformers' `generate` (GenerationConfig's fields: max_new_tokens, do_sample, ...), which
    some VLMs pass on to their vision model with the pixels (Kosmos-2's `generate`) and HF's vision models ignore."""
    global _GENERATION_ARGUMENTS
    if _GENERATION_ARGUMENTS is None:
        from transformers import GenerationConfig

        _GENERATION_ARGUMENTS = frozenset(GenerationConfig().to_dict()) - {"output_attentions",
                                                                             "output_hidden_states", "return_dict"}
    return _GENERATION_ARGUMENTS


def _output_dict(config, return_dict) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


class HFVisionModel(nn.Module):
    """Stands in for a transformers base vision model (ViTModel, DeiTModel, Dinov2Model,
    Dinov2WithRegistersModel, CLIPVisionModel, SiglipVisionModel): the same forward arguments, returns
    `BaseModelOutputWithPooling` (module docstring for each family's last_hidden_state and pooler_output;
    hidden_states with output_hidden_states=True). The transformer runs as `self.core`; `pooler` is HF's
    own pooler module (ViT / DeiT, dense + tanh) or None; `mask_token` HF's mask token parameter (ViT and DeiT with
    use_mask_token, DINOv2, DINOv3) or None: bool_masked_pos [B, patches] then replaces those patches with it, as
    HF's embeddings do (masked image modeling: ViTForMaskedImageModeling; DINOv2 / iBOT-style training)."""

    def __init__(self, config, core: VisionTransformer, family: str = "vit", pooler: nn.Module | None = None,
                 output: type | None = None, mask_token: nn.Parameter | None = None):
        super().__init__()
        self.config, self.core, self.family, self.pooler = config, core, family, pooler
        self._output = output                  # HF's output class where it is not BaseModelOutputWithPooling
        self.mask_token = mask_token
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def post_layernorm(self) -> nn.Module:
        """CLIP's and SigLIP's final norm under HF's name, as vitfast's LayerNorm on HF's tensors: OWL-ViT's and
        OWLv2's detectors apply it to every token of last_hidden_state themselves."""
        if not self.family.startswith(("clip", "siglip", "git")):
            raise AttributeError(f"{type(self).__name__} of the {self.family} family has no post_layernorm")
        return self.core.norm

    def encode(self, pixel_values, interpolate_pos_encoding=None, output_hidden_states=None, bool_masked_pos=None):
        """-> (tokens [B, T, D] after the blocks, before the final norm; hidden_states tuple or None)."""
        if pixel_values is None:
            raise ValueError("pixel_values: expected a tensor [B, C, H, W], got None")
        core, pe = self.core, self.core.patch_embed
        patch_mask = None
        if bool_masked_pos is not None:
            check_image_size(pixel_values, core.in_chans, pe.patch_size)
            gh, gw = pe.grid_for(pixel_values)
            shape = (pixel_values.shape[0], gh * gw)
            if not isinstance(bool_masked_pos, Tensor) or tuple(bool_masked_pos.shape) != shape:
                got = tuple(bool_masked_pos.shape) if isinstance(bool_masked_pos, Tensor) else \
                    type(bool_masked_pos).__name__
                raise ValueError(f"bool_masked_pos: expected [B, patches] = [{shape[0]}, {shape[1]}], got {got}")
            patch_mask = (bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool), self.mask_token)
        antialias, always = _POS_RULE[self.family]
        pos_embed = None
        if (interpolate_pos_encoding or always) and core.pos_embed is not None:
            check_image_size(pixel_values, core.in_chans, pe.patch_size)
            grid = pe.grid_for(pixel_values)
            if grid != pe.grid_size:
                pos_embed = resample_pos_embed(core.pos_embed, grid, pe.grid_size, core.pos_embed_prefix,
                                               antialias=antialias)               # HF's rule
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        tokens, _, hidden = core.forward_tokens(pixel_values, pos_embed=pos_embed,
                                                return_hidden=bool(output_hidden_states), patch_mask=patch_mask)
        return tokens, (tuple(hidden) if output_hidden_states else None)

    def outputs(self, tokens):
        """tokens after the blocks -> (last_hidden_state, pooler_output) of this family."""
        core = self.core
        if self.family in ("clip", "mlcd"):             # the final norm applies to the pooled class token only
            return tokens, core.norm(tokens[:, 0])
        seq = core.norm(tokens)
        if self.family == "git":                        # GIT's: on every token, and no pooled output
            return seq, None
        if self.family.startswith(("dinov2", "dinov3")):
            return seq, seq[:, 0]
        if self.family == "siglip":
            return seq, core.attn_pool(seq) if core.attn_pool is not None else None
        return seq, self.pooler(seq) if self.pooler is not None else None

    def refuse(self, bool_masked_pos=None, attention_mask=None, output_attentions=None, kwargs=None) -> None:
        """Arguments HF takes that vitfast does not implement -> UnsupportedFeatureError naming them."""
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if self.mask_token is not None:          # masked patches: the mask token (encode)
            bool_masked_pos = None
        bad = [name for name, v in (("bool_masked_pos (masked patches)", bool_masked_pos),
                                    ("attention_mask", attention_mask),
                                    ("output_attentions=True", output_attentions or None)) if v is not None]
        bad += [f"{k}" for k in (kwargs or {}) if k not in _generation_arguments()]
        if bad:
            raise UnsupportedFeatureError(f"optimized model: unsupported arguments {bad} (vitfast returns the CLS "
                                          "attention only, via model.core(x, return_cls_attn=True))")

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        self.refuse(bool_masked_pos, attention_mask, output_attentions, kwargs)
        return self.cuda_graphs(self, self._forward, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=output_hidden_states, return_dict=return_dict,
                                bool_masked_pos=bool_masked_pos)

    def _forward(self, pixel_values, interpolate_pos_encoding=None, output_hidden_states=None, return_dict=None,
                 bool_masked_pos=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tokens, hidden = self.encode(pixel_values, interpolate_pos_encoding, output_hidden_states, bool_masked_pos)
        seq, pooled = self.outputs(tokens)
        fields = dict(last_hidden_state=seq, hidden_states=hidden)
        if self.family != "git":                        # GIT's BaseModelOutput has no pooler_output
            fields["pooler_output"] = pooled
        out = (self._output or BaseModelOutputWithPooling)(**fields)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class HFMLCDVisionModel(HFVisionModel):
    """Stands in for transformers' `MLCDVisionModel`: CLIP's vision model (class token first, pre_layrnorm,
    post_layernorm on the pooled class token) with the 2D RoPE of q and k in every attention in place of a position
    table (`ops.rope_qkv`: the first D / 4 pairs turn by the patch's row, the others by its column, as HF's
    `MLCDRotaryEmbedding`; the class token by a learned angle, `class_pos_emb`): any image size. The tables are
    made for each patch grid; `class_pos_emb` gets no gradient through them: in train mode with it trainable the
    forward is refused (freeze it); in eval mode it is taken as a constant."""

    def __init__(self, config, core: VisionTransformer, family: str, pooler, output, class_pos_emb: nn.Parameter,
                 inv_freq: Tensor):
        super().__init__(config, core, family, pooler, output)
        self.class_pos_emb = class_pos_emb                                 # HF's parameter
        self.register_buffer("inv_freq", inv_freq.detach().clone(), persistent=False)

    def rope_tables(self, grid: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [1 + gh · gw, D / 2] in `dtype`: the class token's learned angles, then each patch's (row, column)
        angles as HF's (float32 angles)."""
        if self.training and torch.is_grad_enabled() and self.class_pos_emb.requires_grad:
            raise UnsupportedFeatureError("optimized MLCD model: the class token's learned RoPE angle (class_pos_emb) "
                                          "would get no gradient; freeze it (class_pos_emb.requires_grad_(False)) to "
                                          "train the rest, or run without grad")
        gh, gw = grid
        rows = torch.arange(gh, device=self.inv_freq.device)
        cols = torch.arange(gw, device=self.inv_freq.device)
        pos = torch.stack([rows[:, None].expand(gh, gw), cols[None, :].expand(gh, gw)], -1).reshape(-1, 2)
        cos, sin = qwen_rope_tables(pos, self.inv_freq, torch.float32)
        cls = self.class_pos_emb.detach().float()              # [1, D / 2]: one angle per pair (HF repeats it)
        return torch.cat([cls.cos(), cos]).to(dtype), torch.cat([cls.sin(), sin]).to(dtype)

    def encode(self, pixel_values, interpolate_pos_encoding=None, output_hidden_states=None, bool_masked_pos=None):
        if pixel_values is None:
            raise ValueError("pixel_values: expected a tensor [B, C, H, W], got None")
        core = self.core
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        core._check_trainable()
        x = core.embed(pixel_values)                                                       # (B, 1 + N, D)
        rope = self.rope_tables(core.patch_embed.grid_for(pixel_values),
                                torch.float64 if x.dtype == torch.float64 else torch.float32)
        tokens, _, hidden = core.forward_blocks(x, rope=rope, return_hidden=bool(output_hidden_states))
        return tokens, (tuple(hidden) if output_hidden_states else None)


class HFOvis2VisionModel(nn.Module):
    """Stands in for Ovis2's Ovis2VisionModel: AIMv2's transformer (`self.vision`, an HFVisionModel on vitfast), then
    the visual tokenizer: each hidden_stride x hidden_stride block of tokens joined (HF's zero padding and
    reshapes), head_linear as one GEMM, head_norm, and HF's softmax ("softmax") or its straight-through one-hot of
    the argmax ("st_argmax"; a near tie may pick another token than HF's) -> HF's output object: last_hidden_state
    (the joined tokens), pooler_output (the visual tokens' probabilities, what the VLM embeds)."""

    def __init__(self, config, vision: HFVisionModel, head_linear: nn.Linear, head_norm: nn.LayerNorm, output: type):
        super().__init__()
        self.config, self.vision, self.head_linear, self.head_norm, self._output = \
            config, vision, head_linear, head_norm, output
        self.num_visual_indicator_tokens, self.vocab_size = config.num_visual_indicator_tokens, config.vocab_size
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def transformer(self) -> HFVisionModel:
        return self.vision

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        if output_hidden_states or getattr(self.config, "output_hidden_states", False) and output_hidden_states is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_hidden_states=True (Ovis2's "
                                          "tower)")
        self.vision.refuse(output_attentions=output_attentions, kwargs=kwargs)
        return self.cuda_graphs(self, self._forward, pixel_values, return_dict=return_dict)

    def _forward(self, pixel_values, return_dict=None):
        tokens, _ = self.vision.encode(pixel_values)
        x, _ = self.vision.outputs(tokens)                                              # (n, L, D) after the norm
        stride = self.config.hidden_stride
        if stride > 1:                             # HF's join of s x s blocks, its padding and reshapes as they are
            n, L, D = x.shape
            side = int(L ** 0.5)
            if side * side != L:
                raise ValueError("pixel_values: Ovis2's tokenizer needs a square patch grid")
            pad = (stride - side % stride) % stride
            x = F.pad(x, (0, 0, 0, pad, 0, pad), "constant", 0)
            side += pad
            x = x.reshape(n, side // stride, stride, side // stride, stride, D)
            x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, stride * stride * D)
        logits = ops.layer_norm(ops.linear(x, self.head_linear.weight, None), self.head_norm.weight,
                                self.head_norm.bias, eps=self.head_norm.eps)
        probs = logits.softmax(-1)
        if self.config.tokenize_function == "st_argmax":                               # HF's hard_softmax
            hard = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
            probs = hard - probs.detach() + probs
        out = self._output(last_hidden_state=x, pooler_output=probs)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class _PatchesAsConv(nn.Module):
    """SigLIP 2's patch embedding, an nn.Linear over patches flattened as (row, column, channel) (HF's
    Siglip2ImageProcessor), seen as the conv weight [D, C, P, P] of a vitfast `PatchEmbed`: a view of HF's
    parameter on each access, so HF's tensors stay the parameters (the linear is registered in HF's embeddings,
    `core.hf_embeddings`, not here)."""

    def __init__(self, linear: nn.Linear, in_chans: int, patch_size: tuple[int, int]):
        super().__init__()
        object.__setattr__(self, "linear", linear)                  # not a submodule: no second registration
        self.in_chans, self.patch_size = in_chans, patch_size

    @staticmethod
    def conv_view(weight: Tensor, patch_size: tuple[int, int], in_chans: int) -> Tensor:
        return weight.unflatten(1, (*patch_size, in_chans)).permute(0, 3, 1, 2)      # (D, C, P, P)

    @property
    def weight(self) -> Tensor:
        return self.conv_view(self.linear.weight, self.patch_size, self.in_chans)

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias


class HFSiglip2VisionModel(HFVisionModel):
    """Stands in for transformers' `Siglip2VisionModel` (SigLIP 2 NaFlex): the same forward arguments,
    pixel_values [B, N, C·P·P] (patches flattened as HF's processor does), pixel_attention_mask [B, N] (1 for
    an image's patches, 0 for padding; None: no padding) and spatial_shapes [B, 2] (each image's patch grid);
    returns `BaseModelOutputWithPooling`: last_hidden_state after the final norm, pooler_output from the
    attention-pooling head. The patch embedding is one `ops.linear` with the position embeddings
    (`naflex_position_table`) added in its epilogue; every attention, the head's too, skips the padding keys
    (`key_mask`), as HF's mask does. Padding rows of last_hidden_state are computed as HF computes them. The
    forward has no host synchronisation: CUDA graphs replay it per (B, N) with the masks and shapes as
    inputs. Not checked on CUDA tensors (that would synchronise): a spatial shape with more patches than N,
    which HF refuses."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        self.refuse(None, None, output_attentions, kwargs)
        self._check(pixel_values, pixel_attention_mask, spatial_shapes)
        return self.cuda_graphs(self, self._forward, pixel_values, pixel_attention_mask, spatial_shapes,
                                output_hidden_states=output_hidden_states, return_dict=return_dict)

    def _check(self, pixel_values, mask, spatial_shapes) -> None:
        pe = self.core.patch_embed
        width = self.core.in_chans * pe.patch_size[0] * pe.patch_size[1]
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 3 or pixel_values.shape[2] != width:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected patches [B, N, {width}] (channels x patch_size^2), got {got}")
        B, N, _ = pixel_values.shape
        if not isinstance(spatial_shapes, Tensor) or tuple(spatial_shapes.shape) != (B, 2) \
                or spatial_shapes.is_floating_point() or spatial_shapes.is_complex():
            got = (f"{tuple(spatial_shapes.shape)} {spatial_shapes.dtype}" if isinstance(spatial_shapes, Tensor)
                   else type(spatial_shapes).__name__)
            raise ValueError(f"spatial_shapes: expected an integer tensor [{B}, 2] (patch rows, columns per image), "
                             f"got {got}")
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (B, N)):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"pixel_attention_mask: expected [{B}, {N}] (one entry per patch) or None, got {got}")
        if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
            counts = spatial_shapes.prod(-1)
            if bool((spatial_shapes < 1).any()) or bool((counts > N).any()):
                raise ValueError(f"spatial_shapes: expected patch grids of at least 1x1 with at most N = {N} "
                                 f"patches, got {spatial_shapes.tolist()}")

    def _forward(self, pixel_values, pixel_attention_mask, spatial_shapes, output_hidden_states=None,
                 return_dict=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        core = self.core
        linear = core.hf_embeddings.patch_embedding
        positions = naflex_position_table(core.hf_embeddings.position_embedding.weight, spatial_shapes,
                                          pixel_values.shape[1])                           # (B, N, D)
        x = ops.linear(pixel_values.to(linear.weight.dtype), linear.weight, linear.bias, residual=positions)
        key_mask = None if pixel_attention_mask is None else pixel_attention_mask.to(device=x.device,
                                                                                       dtype=torch.bool)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        tokens, _, hidden = core.forward_blocks(x, key_mask=key_mask, return_hidden=bool(output_hidden_states))
        seq = core.norm(tokens)
        pooled = core.attn_pool(seq, key_mask) if core.attn_pool is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled,
                                         hidden_states=tuple(hidden) if output_hidden_states else None)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class HFIdefics3VisionTransformer(HFVisionModel):
    """Stands in for transformers' `Idefics3VisionTransformer` and `SmolVLMVisionTransformer` (the vision model of
    Idefics3 and SmolVLM, which their VLMs call with each image tile and its patch mask) and
    `Phi4MultimodalVisionModel` (Phi-4-multimodal's, its `img_processor`): pixel_values [B, C, H, W] (images padded
    to one size), patch_attention_mask [B, H/P, W/P] (True for each image's own patches; None: all) ->
    `BaseModelOutput` with last_hidden_state after the final norm (Phi-4's: `BaseModelOutputWithPooling`, the
    pooler_output from its attention-pooling head, which skips the padding keys too). The patches are embedded by
    the patch-embedding kernel, the table rows of `idefics3_position_ids` added; every attention skips the padding
    patches (`key_mask`), as HF's mask does. hidden_states: True, or an index or list of indices that keeps only
    those (transformers 5.2x; Phi-4's VLM asks for one). No host synchronisation: the CUDA graph takes the masks as
    data.

    Phi-4's attention is bidirectional, as HF's eager attention, HF's SDPA path over a padded batch and Microsoft's
    original model compute it: HF's module sets is_causal, which its SDPA path applies to a batch without padding
    (transformers 5.17 to 5.25)."""

    @property
    def embeddings(self) -> nn.Module:
        """HF's embeddings module (Phi-4's VLM reads its patch_embedding's dtype)."""
        return self.core.hf_embeddings

    def forward(self, pixel_values=None, patch_attention_mask=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        self.refuse(None, None, output_attentions, kwargs)
        P = self.core.patch_embed.patch_size
        check_image_size(pixel_values, self.core.in_chans, P)
        grid = (pixel_values.shape[0], pixel_values.shape[-2] // P[0], pixel_values.shape[-1] // P[1])
        if patch_attention_mask is not None and (not isinstance(patch_attention_mask, Tensor)
                                                 or tuple(patch_attention_mask.shape) != grid):
            got = (tuple(patch_attention_mask.shape) if isinstance(patch_attention_mask, Tensor)
                   else type(patch_attention_mask).__name__)
            raise ValueError(f"patch_attention_mask: expected {list(grid)} (batch, patch rows, patch columns) or "
                             f"None, got {got}")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.core.blocks) + 1)
        return self.cuda_graphs(self, self._forward, pixel_values, patch_attention_mask, keep=keep,
                                return_dict=return_dict)

    def _forward(self, pixel_values, patch_attention_mask, keep=None, return_dict=None):
        from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

        core = self.core
        pe, table = core.patch_embed, core.hf_embeddings.position_embedding.weight
        grid = pe.grid_for(pixel_values)
        x = crop_to_patches(pixel_values, pe.patch_size)
        x = ops.patch_embed(x.to(pe.proj.weight.dtype), pe.proj.weight, pe.proj.bias)             # (B, N, D)
        if patch_attention_mask is None:              # every patch (HF's ids even then: its buckets, not an arange)
            mask, key_mask = torch.ones(x.shape[0], *grid, dtype=torch.bool, device=x.device), None
        else:
            mask = patch_attention_mask.to(device=x.device, dtype=torch.bool)
            key_mask = mask.reshape(mask.shape[0], -1)
        x = x + table[idefics3_position_ids(mask, core.hf_embeddings.num_patches_per_side)]
        tokens, _, hidden = core.forward_blocks(x, key_mask=key_mask, return_hidden=keep is not None)
        hidden = None if keep is None else tuple(h if i in keep else None for i, h in enumerate(hidden))
        seq = core.norm(tokens)
        if core.attn_pool is None:
            out = BaseModelOutput(last_hidden_state=seq, hidden_states=hidden)
        else:
            out = BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=core.attn_pool(seq, key_mask),
                                             hidden_states=hidden)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class HFBackbone(BackboneAPI, nn.Module):
    """Stands in for transformers' `Dinov2Backbone`, `Dinov2WithRegistersBackbone` and `DINOv3ViTBackbone` (the
    backbone of Depth Anything and DPT, which `vitfast.optimize` replaces in a copy of those): the same forward
    arguments and `forward_with_filtered_kwargs`; returns HF's `BackboneOutput` (`DINOv3ViTBackboneOutput`)
    with one feature map per stage of `config.out_features` ("stem" is the embeddings, "stageN" block N):
    final-normed with `apply_layernorm` (DINOv3's last stage always), with `reshape_hidden_states` the patch
    tokens as [B, D, H / patch, W / patch], without it the DINOv2 stage's tokens all, DINOv3's patch tokens;
    DINOv3's `return_class_token` adds `cls_tokens`. The config is HF's own object: out_features set on it
    later is read on the next call."""

    def __init__(self, config, vision: HFVisionModel, stage_names):
        super().__init__()
        self.config, self.vision, self.stage_names = config, vision, list(stage_names)
        self.num_features = [config.hidden_size] * len(self.stage_names)
        self.cuda_graphs = CUDAGraphRunner()

    def forward(self, pixel_values=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                attention_mask=None, **kwargs):
        self.vision.refuse(None, attention_mask, output_attentions, kwargs)
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        if not isinstance(output_hidden_states, bool):
            raise UnsupportedFeatureError("output_hidden_states: expected True or False (vitfast returns all hidden "
                                          f"states or none), got {output_hidden_states!r}")
        dinov3 = self.vision.family == "dinov3"
        class_token = dinov3 and bool(getattr(cfg, "return_class_token", False))
        stages = tuple(i for i, name in enumerate(self.stage_names) if name in cfg.out_features)
        maps, cls_tokens, hidden, last = self.cuda_graphs(
            self, self._forward, pixel_values, stages=stages, apply_layernorm=bool(cfg.apply_layernorm),
            reshape=bool(cfg.reshape_hidden_states), class_token=class_token, output_hidden_states=output_hidden_states)
        if dinov3:
            from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTBackboneOutput

            out = DINOv3ViTBackboneOutput(feature_maps=maps, cls_tokens=cls_tokens, hidden_states=hidden)
            if output_hidden_states:          # as HF's: its output made again without hidden states lacks it
                out.last_hidden_state = last
        else:
            from transformers.modeling_outputs import BackboneOutput

            out = BackboneOutput(feature_maps=maps, hidden_states=hidden)
        return out if _output_dict(cfg, return_dict) else out.to_tuple()

    def _forward(self, pixel_values, stages: tuple[int, ...], apply_layernorm: bool, reshape: bool,
                 class_token: bool, output_hidden_states: bool):
        """-> (feature maps, cls_tokens or None, hidden states or None, DINOv3's normed last stage or None)."""
        core, dinov3 = self.vision.core, self.vision.family == "dinov3"
        _, hidden = self.vision.encode(pixel_values, None, True)
        last = len(hidden) - 1
        normed = {}

        def stage(i):                              # HF normalises each stage (DINOv3: the last one in any case)
            if i not in normed:
                normed[i] = core.norm(hidden[i]) if apply_layernorm or (dinov3 and i == last) else hidden[i]
            return normed[i]

        NP, P = core.num_prefix_tokens, core.patch_embed.patch_size
        grid = (pixel_values.shape[-2] // P[0], pixel_values.shape[-1] // P[1])
        maps, cls_tokens = [], []
        for i in stages:
            h = stage(i)
            if class_token:
                cls_tokens.append(h[:, 0])
            if reshape:
                h = h[:, NP:].reshape(h.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            elif dinov3:
                h = h[:, NP:]
            maps.append(h)
        return (tuple(maps), tuple(cls_tokens) if class_token else None,
                hidden if output_hidden_states else None, stage(last) if dinov3 and output_hidden_states else None)


def _linear(layer: nn.Module, x):
    return ops.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(x)


class HFImageClassifier(nn.Module):
    """Stands in for transformers' `ViTForImageClassification` / `DeiTForImageClassification`: the same
    forward arguments, returns `ImageClassifierOutput` (loss when labels are given, logits, hidden_states).
    `classifier` is HF's own nn.Linear (shared), applied to the class token with `ops.linear`; the base
    model is the attribute HF names it (`vit`, `deit`)."""

    def __init__(self, config, vision: HFVisionModel, classifier: nn.Module, loss_function=None, base: str = "vit"):
        super().__init__()
        self.config, self.classifier, self.loss_function, self._base = config, classifier, loss_function, base
        self.add_module(base, vision)
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def vision(self) -> HFVisionModel:
        return getattr(self, self._base)

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, attention_mask=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        self.vision.refuse(None, attention_mask, output_attentions, kwargs)
        return self.cuda_graphs(self, self._forward, pixel_values, labels,
                                interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=output_hidden_states, return_dict=return_dict)

    def _forward(self, pixel_values, labels=None, interpolate_pos_encoding=None, output_hidden_states=None,
                 return_dict=None):
        from transformers.modeling_outputs import ImageClassifierOutput

        tokens, hidden = self.vision.encode(pixel_values, interpolate_pos_encoding, output_hidden_states)
        seq, _ = self.vision.outputs(tokens)
        logits = _linear(self.classifier, seq[:, 0])                                       # (B, classes)
        loss = None
        if labels is not None:
            if self.loss_function is None:
                raise UnsupportedFeatureError("labels: this transformers version has no model.loss_function; "
                                              "compute the loss from the logits")
            loss = self.loss_function(labels, logits, self.config)
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class HFDeiTWithTeacher(nn.Module):
    """Stands in for transformers' `DeiTForImageClassificationWithTeacher`: logits are the mean of the
    class token's head and the distillation token's head (both HF's own nn.Linear, shared)."""

    def __init__(self, config, vision: HFVisionModel, cls_classifier: nn.Module, distillation_classifier: nn.Module):
        super().__init__()
        self.config, self.deit = config, vision
        self.cls_classifier, self.distillation_classifier = cls_classifier, distillation_classifier
        self.cuda_graphs = CUDAGraphRunner()

    def forward(self, pixel_values=None, interpolate_pos_encoding=None, attention_mask=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        self.deit.refuse(None, attention_mask, output_attentions, kwargs)
        return self.cuda_graphs(self, self._forward, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=output_hidden_states, return_dict=return_dict)

    def _forward(self, pixel_values, interpolate_pos_encoding=None, output_hidden_states=None, return_dict=None):
        from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

        tokens, hidden = self.deit.encode(pixel_values, interpolate_pos_encoding, output_hidden_states)
        seq, _ = self.deit.outputs(tokens)
        cls_logits = _linear(self.cls_classifier, seq[:, 0])
        distillation_logits = _linear(self.distillation_classifier, seq[:, 1])
        out = DeiTForImageClassificationWithTeacherOutput(logits=(cls_logits + distillation_logits) / 2,
                                                          cls_logits=cls_logits,
                                                          distillation_logits=distillation_logits,
                                                          hidden_states=hidden)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


class HFCLIPSegVisionModel(HFVisionModel):
    """Stands in for transformers' `CLIPSegVisionModel`: CLIP's vision model, whose forward resamples the position
    table by default (`interpolate_pos_encoding=True`, CLIPSeg's: its processor's 352 px images on a table made for
    224 px)."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=True, **kwargs):
        return super().forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)


class HFCLIPVisionWithProjection(nn.Module):
    """Stands in for transformers' `CLIPVisionModelWithProjection` (and MetaClip2's): image_embeds =
    visual_projection of the pooled (final-normed) class token, with HF's own projection (shared, no bias),
    in `output`, the model's own output class (CLIPVisionModelOutput, MetaClip2VisionModelOutput)."""

    def __init__(self, config, vision: HFVisionModel, visual_projection: nn.Linear, output: type):
        super().__init__()
        self.config, self.vision_model, self.visual_projection = config, vision, visual_projection
        self.output = output
        self.cuda_graphs = CUDAGraphRunner()

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        self.vision_model.refuse(None, None, output_attentions, kwargs)
        return self.cuda_graphs(self, self._forward, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=output_hidden_states, return_dict=return_dict)

    def _forward(self, pixel_values, interpolate_pos_encoding=False, output_hidden_states=None, return_dict=None):
        tokens, hidden = self.vision_model.encode(pixel_values, interpolate_pos_encoding, output_hidden_states)
        seq, pooled = self.vision_model.outputs(tokens)
        embeds = _linear(self.visual_projection, pooled)
        out = self.output(image_embeds=embeds, last_hidden_state=seq, hidden_states=hidden)
        return out if _output_dict(self.config, return_dict) else out.to_tuple()


__all__ = ["optimize_hf", "CLASSES", "HFVisionModel", "HFSiglip2VisionModel", "HFIdefics3VisionTransformer",
           "HFImageClassifier", "HFDeiTWithTeacher", "HFCLIPVisionWithProjection", "HFBackbone"]
