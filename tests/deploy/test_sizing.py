"""The predicted tensor list and GGUF types/bytes equal what extraction and llama.cpp really write."""

from collections import Counter

import pytest
from safetensors import safe_open

from amoeba_export.deploy.sizing import gguf_tensor_bytes, gguf_tensor_type, subnet_tensors
from amoeba_export.extract import write_subnet
from amoeba_export.plan import load_elastic

SHAPES = [(6, 1.0, "global"), (3, 0.5, "global"), (4, 0.75, "uniform"), (5, 0.625, "global")]


@pytest.mark.parametrize("compensate", [True, False])
def test_tensor_list_matches_extraction(deploy_plan_dir, tmp_path, compensate):
    elastic, plan = load_elastic(deploy_plan_dir, compensate=compensate)
    for i, (d, w, mode) in enumerate(SHAPES):
        shape = plan.shape(d, w, mode)
        out = write_subnet(elastic, shape, tmp_path / f"s{i}", source_dir=plan.model_dir)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            real = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        predicted = {t.name: t.shape for t in subnet_tensors(plan.dims, shape, compensate=compensate)}
        assert predicted == real, shape.name


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_gguf_types_and_bytes_match_llama_cpp(deploy_plan_dir, tmp_path, quant):
    import gguf

    from amoeba_export.backends import get_backend

    elastic, plan = load_elastic(deploy_plan_dir)
    backend = get_backend("gguf")
    for i, (d, w, mode) in enumerate(SHAPES[:2]):
        shape = plan.shape(d, w, mode)
        hf = write_subnet(elastic, shape, tmp_path / f"hf{i}", source_dir=plan.model_dir)
        art = backend.export(hf, tmp_path / f"a{i}", quant, progress=False)
        reader = gguf.GGUFReader(str(art.model_file))
        real = Counter((t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors)
        tensors = subnet_tensors(plan.dims, shape, compensate=elastic.compensating)
        predicted = Counter()
        for t in tensors:
            kind = gguf_tensor_type(t, quant, shape.depth, plan.dims.tied_embeddings)
            predicted[(kind, t.numel, gguf_tensor_bytes(t, kind))] += 1
        assert predicted == real, shape.name
