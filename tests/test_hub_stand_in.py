"""Round trips through the offline Hub stand-in: push_to_hub then from_pretrained / load_dataset / PeftModel, in
process (httpx2.MockTransport, no sockets) and from a subprocess (loopback HTTP server)."""

import hashlib
import json
import subprocess
import sys
import textwrap

import httpx2
import pytest
import torch
from conftest import make_model
from hub_stand_in import ENDPOINT, install, uninstall
from transformers import AutoModel, AutoProcessor, BertConfig, BertModel

from mu0 import Mu0ForTracePrediction, Mu0Processor


def perturbed_model(config, seed=0):
    """A tiny μ0 model whose zero-initialised gates got values, so that every weight matters."""
    model = make_model(config, seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).eval()


def assert_same_state(actual, expected):
    actual, expected = actual.state_dict(), expected.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


def assert_clean(hub):
    assert not hub.unknown_requests, hub.unknown_requests
    assert not hub.errors, hub.errors[0]


def test_model_and_processor_round_trip(hub, tiny_config, tiny_processor):
    model = perturbed_model(tiny_config)
    model.push_to_hub("user/tiny")
    tiny_processor.push_to_hub("user/tiny")

    files = hub.files("user/tiny")
    assert {"config.json", "model.safetensors", "modeling_mu0.py", "processor_config.json"} <= files.keys()
    assert hub.repo("user/tiny").resolve("main").files["model.safetensors"].lfs  # went through the LFS batch + PUT
    assert len(hub.history("user/tiny")) == 3  # initial commit, model, processor

    loaded = AutoModel.from_pretrained("user/tiny")
    processor = AutoProcessor.from_pretrained("user/tiny")
    assert isinstance(loaded, Mu0ForTracePrediction) and isinstance(processor, Mu0Processor)
    assert_same_state(loaded, model)
    assert processor.delta_scale == tiny_processor.delta_scale
    assert any(method == "GET" and path.endswith("/model.safetensors") and status == 200
               for method, path, status in hub.requests), "the weights were not downloaded from the stand-in"
    assert_clean(hub)


def test_dataset_round_trip_regular_and_streaming(hub):
    import datasets

    rows = {"episode": [0, 0, 1, 2], "instruction": ["push", "push", "open the drawer", "pick"],
            "trace": [[0.0, 1.0], [1.5, 2.0], [3.0, -1.0], [0.25, 0.5]]}
    datasets.Dataset.from_dict(rows).push_to_hub("user/ds")
    assert any(path.endswith(".parquet") and blob.lfs
               for path, blob in hub.repo("user/ds", "dataset").resolve("main").files.items())

    loaded = datasets.load_dataset("user/ds", split="train")
    assert loaded.to_dict() == rows
    streamed = list(datasets.load_dataset("user/ds", split="train", streaming=True))
    assert streamed == [dict(zip(rows, values)) for values in zip(*rows.values())]
    assert any(status == 206 for _, _, status in hub.requests), "streaming should read the parquet file by ranges"

    # A second push replaces the shard; nothing stale may come back (the stand-in clears HfFileSystem's caches).
    datasets.Dataset.from_dict({"episode": [7], "instruction": ["stack"], "trace": [[9.0, 9.0]]}).push_to_hub("user/ds")
    assert datasets.load_dataset("user/ds", split="train")["instruction"] == ["stack"]
    assert [row["episode"] for row in datasets.load_dataset("user/ds", split="train", streaming=True)] == [7]
    assert_clean(hub)


def test_peft_adapter_round_trip(hub):
    from peft import LoraConfig, PeftModel, get_peft_model

    inputs = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        base_output = tiny_bert()(inputs).last_hidden_state
    adapted = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    adapted.eval()
    with torch.no_grad():
        expected = adapted(inputs).last_hidden_state
    assert not torch.allclose(expected, base_output)  # the adapter changes the outputs, so loading it is visible
    adapted.push_to_hub("user/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= hub.files("user/adapter").keys()

    loaded = PeftModel.from_pretrained(tiny_bert(), "user/adapter").eval()
    with torch.no_grad():
        actual = loaded(inputs).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_clean(hub)


LOAD_IN_SUBPROCESS = textwrap.dedent(
    """
    import sys, torch
    from huggingface_hub import constants
    from transformers import AutoModel
    assert not constants.HF_HUB_OFFLINE and constants.ENDPOINT.startswith("http://127.0.0.1:"), constants.ENDPOINT
    model = AutoModel.from_pretrained("user/tiny", trust_remote_code=True)  # code and weights come from the server
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    torch.save(model.state_dict(), sys.argv[1])
    """
)


def test_subprocess_loads_through_loopback_server(hub, tmp_path, tiny_config):
    model = perturbed_model(tiny_config, seed=1)
    model.push_to_hub("user/tiny")
    pushed = len(hub.requests)
    script, out = tmp_path / "load.py", tmp_path / "state.pt"
    script.write_text(LOAD_IN_SUBPROCESS)
    with hub.serve() as endpoint:
        env = hub.subprocess_env(endpoint, home=tmp_path / "child_home")  # its own cache: it must download
        result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env,
                                timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out, weights_only=True)
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    served = hub.requests[pushed:]
    assert ("GET", "/user/tiny/resolve/%s/model.safetensors" % hub.repo("user/tiny").branches["main"], 200) in served
    assert_clean(hub)


# ---------------------------------------------------------------------- the stand-in's own protocol details
def test_unknown_endpoints_and_missing_entries_are_explicit(hub):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    hub.upload("user/seeded", {"a/b.txt": "hello", "weights.safetensors": b"\0" * 10})
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/seeded", "nope.txt")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("user/seeded", path_in_repo="no/such/folder"))
    with pytest.raises(HfHubHTTPError, match="no endpoint for GET /api/models/user/seeded/discussions"):
        api.get_repo_discussions("user/seeded").__next__()
    assert len(hub.unknown_requests) == 1
    assert hub.unknown_requests[0].startswith("GET /api/models/user/seeded/discussions")

    assert sorted(entry.path for entry in api.list_repo_tree("user/seeded", recursive=True)) == [
        ".gitattributes", "a", "a/b.txt", "weights.safetensors"]
    info = {entry.path: entry for entry in api.get_paths_info("user/seeded", ["a", "weights.safetensors", "zzz"])}
    assert info.keys() == {"a", "weights.safetensors"} and info["weights.safetensors"].lfs.size == 10
    with open(hf_hub_download("user/seeded", "a/b.txt")) as file:
        assert file.read() == "hello"

    api.create_branch("user/seeded", branch="dev")
    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="a/b.txt", repo_id="user/seeded", revision="dev")
    api.create_tag("user/seeded", tag="v1", revision="dev")
    assert hub.read("user/seeded", "a/b.txt", revision="v1") == b"on dev"
    assert hub.read("user/seeded", "a/b.txt") == b"hello"
    with open(hf_hub_download("user/seeded", "a/b.txt", revision="v1")) as file:
        assert file.read() == "on dev"
    refs = api.list_repo_refs("user/seeded")
    assert {branch.name for branch in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="c.txt", repo_id="user/seeded", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub.read("user/seeded", "c.txt", revision="refs/pr/1") == b"proposal"
    assert "c.txt" not in hub.files("user/seeded")


def test_resolve_serves_ranges_and_etags(hub):
    data = bytes(range(256)) * 4
    sha = hub.upload("user/blob", {"data.bin": data, "notes.txt": "plain"})
    with httpx2.Client(transport=httpx2.MockTransport(hub.handle)) as client:
        head = client.head(f"{ENDPOINT}/user/blob/resolve/main/data.bin")
        assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
        assert head.headers["ETag"].strip('"') == hashlib.sha256(data).hexdigest()
        assert int(head.headers["Content-Length"]) == len(data) and head.content == b""
        part = client.get(f"{ENDPOINT}/user/blob/resolve/{sha}/data.bin", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        suffix = client.get(f"{ENDPOINT}/user/blob/resolve/main/data.bin", headers={"Range": "bytes=-5"})
        assert suffix.status_code == 206 and suffix.content == data[-5:]
        assert client.get(f"{ENDPOINT}/user/blob/resolve/main/data.bin",
                          headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        missing = client.get(f"{ENDPOINT}/user/blob/resolve/main/other.bin")
        assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
        no_branch = client.get(f"{ENDPOINT}/user/blob/resolve/nobranch/data.bin")
        assert no_branch.headers["X-Error-Code"] == "RevisionNotFound"
        tree = client.get(f"{ENDPOINT}/api/models/user/blob/tree/main/missing")
        assert tree.status_code == 404 and tree.headers["X-Error-Code"] == "EntryNotFound"
        assert json.loads(client.get(f"{ENDPOINT}/api/models/user/blob").content)["sha"] == sha
    assert_clean(hub)


def test_install_is_undone(tmp_path):
    import datasets.config
    from huggingface_hub import constants, get_session

    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, datasets.config.HF_HUB_OFFLINE,
              datasets.config.HF_DATASETS_CACHE)
    assert constants.HF_HUB_OFFLINE  # the suite runs offline
    patch = pytest.MonkeyPatch()
    try:
        stand_in = install(patch, tmp_path)
        assert constants.ENDPOINT == ENDPOINT and not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE
        assert constants.HF_HUB_CACHE.startswith(str(tmp_path)) and str(datasets.config.HF_DATASETS_CACHE).startswith(
            str(tmp_path))
        assert get_session().get(f"{ENDPOINT}/api/whoami-v2").json()["name"] == "user"
        assert stand_in.requests == [("GET", "/api/whoami-v2", 200)]
    finally:
        uninstall()
        patch.undo()
    after = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, datasets.config.HF_HUB_OFFLINE,
             datasets.config.HF_DATASETS_CACHE)
    assert after == before
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(OfflineModeIsEnabled):
        get_session().get(f"{ENDPOINT}/api/whoami-v2")


def test_a_stale_transformers_api_client_is_replaced(monkeypatch, tmp_path, tiny_config):
    """transformers caches one HfApi on first use; one made before the stand-in must not send pushes to the real Hub."""
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import HfApi

    monkeypatch.setattr(transformers_hub, "_hf_api", HfApi(endpoint="https://huggingface.co"))
    stand_in = install(monkeypatch, tmp_path)
    try:
        make_model(tiny_config).push_to_hub("user/stale-client")
        assert "model.safetensors" in stand_in.files("user/stale-client")
    finally:
        uninstall()
