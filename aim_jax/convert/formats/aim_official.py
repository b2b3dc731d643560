"""Official AIM checkpoints (mmaction2 `.pth`: `{'state_dict': {'backbone.*', 'cls_head.*'}}`).

The ViT backbones of the model zoo (CLIP `ViT_CLIP` and ImageNet-21K
`ViT_ImageNet`) map name for name onto `aim_jax.convert.official_names`. Everything but the
head count and the joint adapter scale is read from the keys and shapes:
width, layers, patch, resolution (positional embedding), num_frames (temporal
embedding), num_classes (fc_cls), num_tadapter (`T_Adapter_in`), adapter ratio
and positions. The head count defaults to width / 64 and the scale to the
official 0.5 (1.0 with num_tadapter=2, the SSv2 recipe); both can be given, and
`python -m aim_jax.convert aim` reads both from the file's `meta.model_config`
where `export-aim` wrote it (`aim_jax.convert.source_config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from aim_jax.convert import registry
from aim_jax.errors import ConversionError
from aim_jax.convert import official_names
from aim_jax.convert.formats import clip as clip_format
from aim_jax.models.factory import resolve_model_config
from aim_jax.models.vit import FAMILIES


def detect(keys: Iterable[str]) -> bool:
  keys = set(keys)
  vit = ('backbone.conv1.weight' in keys) or ('backbone.patch_embed.proj.weight' in keys
                                              and 'backbone.cls_token' in keys)
  return vit and 'cls_head.fc_cls.weight' in keys and 'backbone.temporal_embedding' in keys


def convert(state_dict: Mapping[str, np.ndarray], heads: int | None = None,
            adapter_scale: float | None = None, act: str | None = None):
  """-> ({'backbone', 'cls_head'} params, full model config, report).

  `act`: the MLP activation of a CLIP backbone ('quick_gelu', the official
  models; 'gelu' for one built on an OpenCLIP GELU model, family 'clip_gelu'),
  which no tensor records. `export-aim` writes it into the file's meta.
  """
  fields = official_names.infer_aim_config(state_dict, heads=heads, adapter_scale=adapter_scale)
  if act is not None:
    if fields['backbone'] == 'clip':
      fields['backbone'] = clip_format.family_for(act)
    elif act != FAMILIES[fields['backbone']]['mlp_act']:
      raise ConversionError(
          f'act={act!r}: a {fields["backbone"]} backbone (backbone.cls_token) uses '
          f'{FAMILIES[fields["backbone"]]["mlp_act"]}')
  params, report = official_names.aim_params_from_state_dict(state_dict, fields['heads'],
                                                       fields['backbone'])
  if adapter_scale is None and fields['adapters']['joint']:
    report.notices.append(
        f'adapter scale {fields["adapters"]["scale"]} (official default for num_tadapter='
        f'{fields["adapters"]["num_tadapter"]}; no tensor records it: pass --adapter-scale '
        'if the model was trained with another)')
  if fields['backbone'] in ('clip', 'clip_gelu'):
    report.notices.append(f'MLP activation: {FAMILIES[fields["backbone"]]["mlp_act"]} '
                          f'(family {fields["backbone"]})' + (
                              '' if act else '; pass --act gelu for a backbone built on an '
                              'OpenCLIP GELU model'))
  if heads is None:
    report.notices.append(registry.heads_guessed(fields['heads']))
  return params, resolve_model_config(fields), report


registry.register(registry.Format(
    name='aim', kind='aim', detect=detect, convert=convert,
    description='official AIM model zoo (mmaction2 .pth with backbone.* and cls_head.*)'))
