"""Hugging Face Hub round trips: save_for_hf / push_to_hf_hub / save_pretrained -> hf-hub: and local-dir: loads.

Every registered model is saved in a reduced configuration (its model arguments must come back) and
loaded three ways: from a local folder (``local-dir:``), from a Hugging Face cache laid out by hand
with ``HF_HUB_OFFLINE=1``, and from a small Hub-compatible HTTP server on 127.0.0.1 selected with
``HF_ENDPOINT`` (whose downloads must then also load offline). huggingface_hub reads HF_ENDPOINT /
HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported, so the Hub loads run in subprocesses with the
environment set; nothing here ever contacts huggingface.co.

Broken repos must fail, with plain ``timm.create_model`` too, and ``timm_binaryvit.hub.load_model``
must say which file is at fault and why.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm
from timm.models import save_for_hf
from timm.models._hub import save_config_for_hf

from timm_binaryvit import BinaryDeiT, BinaryViT, hub, model_card

ORG = 'testorg'
COMMIT = 'a' * 40  # the commit hash our fake Hub serves / our hand-built cache records

PYRAMID = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
               mlp_ratios=(2, 2, 2, 2), sr_ratios=(2, 2, 1, 1), img_size=64, num_classes=7)
DEIT = dict(img_size=64, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2, num_classes=5)
# one non-uniform configuration per family, so that arguments cannot round-trip by accident
VARIANT_OVERRIDES = {
    'binaryvit_small_patch4_224': dict(depths=(1, 2, 1, 1), sr_ratios=(4, 2, 2, 1)),
    'binary_deit_small_gap_mb_affine_patch16_224': dict(depth=2, num_heads=4, img_size=(64, 32)),
}
REGISTERED = hub.registered_models()


def reduced_kwargs(name):
    base = PYRAMID if name.startswith('binaryvit') else DEIT
    return dict(base, **VARIANT_OVERRIDES.get(name, {}))


def perturb_(model, seed=0):
    """Move every parameter and buffer away from its initial value so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            if key.endswith('running_var'):
                value.copy_(0.5 + noise.abs())
            elif value.numel() == 1:  # the attention binariser's scale: keep it positive
                value.mul_(1 + 0.2 * noise.abs())
            else:
                value.add_(0.1 * noise)
    return model


def make_model(name, seed=0, **overrides):
    model = timm.create_model(name, **dict(reduced_kwargs(name), **overrides))
    return perturb_(model, seed).eval()


def example_input(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, model.in_chans, *model.img_size, generator=generator)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------------------------------------
# Fixtures: a repo folder per registered model (saved with timm's own save_for_hf) and broken repos


@pytest.fixture(scope='module')
def repos(tmp_path_factory):
    """``{'dir', 'expected': {repo: logits}, 'args': {repo: constructor args}}``; inputs in ``dir/inputs``."""
    root = tmp_path_factory.mktemp('repos')
    (root / 'inputs').mkdir()
    expected, args = {}, {}
    for i, name in enumerate(REGISTERED):
        model = make_model(name, seed=i)
        x = example_input(model)
        save_for_hf(model, root / name, safe_serialization=True)
        save_file({'x': x}, str(root / 'inputs' / f'{name}.safetensors'))
        expected[name] = logits(model, x)
        args[name] = hub.constructor_args(model)
        assert expected[name].std() > 0

    bvit, deit = 'binaryvit', 'binary_deit_small_gap_patch16_224'
    # config.json naming an architecture nobody registers
    shutil.copytree(root / bvit, root / 'unknown-arch')
    config = json.loads((root / bvit / 'config.json').read_text())
    config['architecture'] = 'no_such_model_xyz'
    (root / 'unknown-arch' / 'config.json').write_text(json.dumps(config))
    # model.safetensors cut in half
    shutil.copytree(root / bvit, root / 'truncated')
    data = (root / bvit / 'model.safetensors').read_bytes()
    (root / 'truncated' / 'model.safetensors').write_bytes(data[:len(data) // 2])
    # a BinaryViT config.json with the weights of a DeiT
    shutil.copytree(root / bvit, root / 'wrong-weights')
    shutil.copy(root / deit / 'model.safetensors', root / 'wrong-weights' / 'model.safetensors')
    # config.json without any weights file
    (root / 'config-only').mkdir()
    shutil.copy(root / bvit / 'config.json', root / 'config-only' / 'config.json')
    return dict(dir=root, expected=expected, args=args)


def repo_files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def build_hf_cache(cache: Path, repo_id: str, files, commit: str = COMMIT):
    """The layout huggingface_hub keeps: models--ORG--REPO/{blobs/<etag>, refs/main, snapshots/<commit>/<file>}."""
    folder = cache / f'models--{repo_id.replace("/", "--")}'
    (folder / 'blobs').mkdir(parents=True, exist_ok=True)
    (folder / 'refs').mkdir(exist_ok=True)
    (folder / 'snapshots' / commit).mkdir(parents=True, exist_ok=True)
    (folder / 'refs' / 'main').write_text(commit)
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        (folder / 'blobs' / etag).write_bytes(data)
        link = folder / 'snapshots' / commit / name
        try:
            link.symlink_to(Path('..', '..', 'blobs', etag))
        except OSError:  # no symlinks on this filesystem: huggingface_hub then copies too
            link.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# A Hub-compatible HTTP server


class _HubHandler(BaseHTTPRequestHandler):
    """Answers what hf_hub_download asks: HEAD / GET ``/{repo}/resolve/{revision}/{file}``
    (ETag, X-Repo-Commit, Content-Length; Hub error codes on 404) and ``/api/models/{repo}``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _reply(self, status, headers, body=b'', send_body=True):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, status, code, message, send_body, commit=None):
        headers = {'X-Error-Code': code, 'X-Error-Message': message, 'Content-Type': 'application/json'}
        if commit:
            headers['X-Repo-Commit'] = commit
        self._reply(status, headers, json.dumps({'error': message}).encode(), send_body)

    def _serve(self, send_body):
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append((self.command, path))
        repos = self.server.repos
        match = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path)
        if match:
            repo_id, revision, filename = match.groups()
            if repo_id not in repos:
                return self._error(404, 'RepoNotFound', 'Repository not found', send_body)
            if revision not in ('main', COMMIT):
                return self._error(404, 'RevisionNotFound', 'Invalid rev id', send_body)
            data = repos[repo_id].get(filename)
            if data is None:
                return self._error(404, 'EntryNotFound', 'Entry not found', send_body, commit=COMMIT)
            headers = {'ETag': f'"{hashlib.sha256(data).hexdigest()}"', 'X-Repo-Commit': COMMIT,
                       'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes'}
            status, body = 200, data
            range_header = self.headers.get('Range')
            if range_header and send_body:
                start = int(re.fullmatch(r'bytes=(\d+)-(\d*)', range_header).group(1))
                body = data[start:]
                status = 206
                headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
            return self._reply(status, headers, body, send_body)
        match = re.fullmatch(r'/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?', path)
        if match and match.group(1) in repos:
            info = {'id': match.group(1), 'modelId': match.group(1), 'sha': COMMIT,
                    'siblings': [{'rfilename': f} for f in sorted(repos[match.group(1)])]}
            return self._reply(200, {'Content-Type': 'application/json'}, json.dumps(info).encode(), send_body)
        return self._error(404, 'RepoNotFound', 'Repository not found', send_body)


@pytest.fixture(scope='module')
def hub_server(repos):
    served = {f'{ORG}/{p.name}': repo_files(p) for p in repos['dir'].iterdir() if p.name != 'inputs'}
    server = ThreadingHTTPServer(('127.0.0.1', 0), _HubHandler)
    server.repos = served
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# Loading in a subprocess with the Hugging Face environment set

_LOADER = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
import huggingface_hub.constants as constants
import timm
import timm_binaryvit
from timm_binaryvit import hub

jobs = json.load(open(sys.argv[1]))
results, outputs = {}, {}
results['__env__'] = dict(endpoint=constants.ENDPOINT, offline=constants.HF_HUB_OFFLINE, cache=constants.HF_HUB_CACHE)
for job in jobs:
    try:
        if job['how'] == 'timm':
            model = timm.create_model(job['name'], pretrained=True)
        else:
            model = hub.load_model(job['name'])
        x = load_file(job['input'])['x']
        with torch.no_grad():
            outputs[job['id']] = model.eval()(x).contiguous()
        results[job['id']] = dict(ok=True, args=hub.constructor_args(model))
    except Exception as e:
        chain, cause = [], e
        while cause is not None and len(chain) < 10:
            chain.append(f'{type(cause).__name__}: {cause}')
            cause = cause.__cause__ or cause.__context__
        results[job['id']] = dict(ok=False, type=type(e).__name__, message=str(e), chain=chain,
                                  file=getattr(e, 'file', None))
save_file(outputs, sys.argv[2] + '/logits.safetensors')
json.dump(results, open(sys.argv[2] + '/results.json', 'w'))
'''


def hf_env(hf_home: Path, offline: bool, endpoint=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('HF_') and k.lower() not in ('http_proxy', 'https_proxy', 'all_proxy')}
    env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / 'hub'), HF_HUB_OFFLINE='1' if offline else '0',
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_IMPLICIT_TOKEN='1', HF_HUB_DISABLE_PROGRESS_BARS='1',
               NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost', TIMM_BINARYVIT_AUTOLOAD='1')
    # offline runs point the endpoint at a closed local port too: nothing may reach huggingface.co
    env['HF_ENDPOINT'] = endpoint or 'http://127.0.0.1:9'
    return env


def run_loader(tmp_path: Path, env, jobs, label):
    work = tmp_path / label
    work.mkdir()
    (work / 'jobs.json').write_text(json.dumps(jobs))
    (work / 'loader.py').write_text(_LOADER)
    proc = subprocess.run([sys.executable, str(work / 'loader.py'), str(work / 'jobs.json'), str(work)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((work / 'results.json').read_text())
    outputs = load_file(str(work / 'logits.safetensors'))
    return results, outputs


def model_jobs(repos, hows=('timm', 'helper')):
    return [dict(id=f'{how}:{name}', how=how, name=f'hf-hub:{ORG}/{name}',
                 input=str(repos['dir'] / 'inputs' / f'{name}.safetensors'))
            for name in REGISTERED for how in hows]


def error_jobs(repos, names, hows=('timm', 'helper')):
    x = str(repos['dir'] / 'inputs' / 'binaryvit.safetensors')
    return [dict(id=f'{how}:{name}', how=how, name=f'hf-hub:{ORG}/{name}', input=x) for name in names for how in hows]


def check_models(repos, results, outputs):
    for name in REGISTERED:
        for how in ('timm', 'helper'):
            key = f'{how}:{name}'
            assert results[key]['ok'], results[key]
            # the kernel chosen in another process may round differently (int8 or float32 products)
            assert torch.allclose(outputs[key], repos['expected'][name], rtol=1e-4, atol=1e-5), key
            assert results[key]['args'] == repos['args'][name], key


def check_errors(results, cases):
    """Plain timm must fail; the helper must name the file and the problem."""
    for name, (file, *words) in cases.items():
        plain, helper = results[f'timm:{name}'], results[f'helper:{name}']
        assert not plain['ok'], f'timm.create_model silently loaded the broken repo {name}'
        assert not helper['ok'] and helper['type'] == 'LoadError', helper
        message = helper['message']
        assert f'{ORG}/{name}' in message and file in message, message
        for word in words:
            assert word.lower() in message.lower(), (word, message)


# ---------------------------------------------------------------------------------------------
# No ImageNet weights


@pytest.mark.parametrize('name', REGISTERED)
def test_registered_configs_carry_no_weights(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert not cfg.url and not cfg.hf_hub_id and not cfg.file
    with pytest.raises(RuntimeError, match='No pretrained weights exist'):
        timm.create_model(name, pretrained=True, device='meta')
    with pytest.raises(RuntimeError, match='No pretrained weights exist'):
        hub.load_model(name, pretrained=True, device='meta')
    assert timm.list_models(name, pretrained=True) == []


# ---------------------------------------------------------------------------------------------
# Saving and local folders


@pytest.mark.parametrize('name', REGISTERED)
def test_save_for_hf_roundtrip_local_dir(repos, name):
    folder = repos['dir'] / name
    assert (folder / 'model.safetensors').is_file()
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name
    assert config['num_classes'] == reduced_kwargs(name)['num_classes']
    assert config['pretrained_cfg']['num_classes'] == config['num_classes']
    for key, value in reduced_kwargs(name).items():
        recorded = config['model_args'][key]
        expected = list(value) if isinstance(value, tuple) else value
        if key == 'img_size' and isinstance(value, int):
            expected = [value, value]
        assert recorded == expected, key

    x = load_file(str(repos['dir'] / 'inputs' / f'{name}.safetensors'))['x']
    for source in (f'local-dir:{folder}', str(folder)):
        if source == str(folder):
            model = hub.load_model(source)
        else:
            model = timm.create_model(source, pretrained=True)
        assert hub.constructor_args(model) == repos['args'][name]
        assert torch.equal(logits(model, x), repos['expected'][name])
    assert tuple(model.pretrained_cfg['input_size'][1:]) == tuple(model.img_size)


@pytest.mark.parametrize('name', REGISTERED)
def test_save_pretrained_roundtrip(tmp_path, name):
    model = make_model(name, seed=3)
    x = example_input(model)
    hub.save_pretrained(model, tmp_path / 'repo')
    assert sorted(p.name for p in (tmp_path / 'repo').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'repo' / 'config.json').read_text())
    assert config['model_args'] == hub.constructor_args(model)
    loaded = timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True)
    assert hub.constructor_args(loaded) == hub.constructor_args(model)
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize('build', [
    lambda: BinaryViT(**dict(PYRAMID, fp_transitions=True, depths=(2, 1, 1, 1))),
    lambda: BinaryDeiT(**dict(DEIT, class_token=False, global_pool='avg', multi_branch_pool=True, affine=True)),
    lambda: BinaryDeiT(**dict(DEIT, class_token=True, global_pool='token', affine=True, in_chans=1)),
], ids=['BinaryViT', 'BinaryDeiT-row4', 'BinaryDeiT-cls-affine-1ch'])
def test_save_pretrained_models_built_without_the_factory(tmp_path, build):
    model = perturb_(build()).eval()
    assert not hasattr(model, 'pretrained_cfg')
    x = example_input(model)
    hub.save_pretrained(model, tmp_path)
    assert not hasattr(model, 'pretrained_cfg') and not hasattr(model, '_traits')  # left as it was
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert type(loaded) is type(model)
    assert hub.constructor_args(loaded) == hub.constructor_args(model)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert tuple(loaded.pretrained_cfg['input_size']) == (model.in_chans, *model.img_size)


def test_plain_save_for_hf_with_explicit_model_args(tmp_path):
    """timm's own save_for_hf takes constructor_args as model_args (also after re-heading the model)."""
    model = make_model('binaryvit_small_fpembed_patch4_224')
    model.reset_classifier(3)
    perturb_(model, seed=5).eval()
    x = example_input(model)
    save_for_hf(model, tmp_path, model_args=hub.constructor_args(model), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert loaded.num_classes == 3 and loaded.fp_transitions
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_reheaded_load_keeps_the_backbone(repos):
    """timm's num_classes override on a repo drops the saved head and keeps the rest."""
    name = 'binaryvit'
    model = timm.create_model(f'local-dir:{repos["dir"] / name}', pretrained=True, num_classes=4).eval()
    x = load_file(str(repos['dir'] / 'inputs' / f'{name}.safetensors'))['x']
    saved = timm.create_model(f'local-dir:{repos["dir"] / name}', pretrained=True).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                           saved.forward_head(saved.forward_features(x), pre_logits=True))


@pytest.mark.parametrize('name', REGISTERED)
def test_full_size_configuration_roundtrips(tmp_path, name):
    """The registered (full-size) configurations: config.json rebuilds the same architecture (on meta)."""
    model = timm.create_model(name, device='meta')
    save_config_for_hf(model, tmp_path / 'config.json', model_args=hub.constructor_args(model))
    loaded = timm.create_model(f'local-dir:{tmp_path}', device='meta')
    assert hub.constructor_args(loaded) == hub.constructor_args(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', REGISTERED)
def test_model_family_by_name_and_by_model(name):
    """One answer to "which family is this": from the registered name without building, and from the model."""
    model = timm.create_model(name, device='meta')
    family = hub.model_family(name)
    assert family == hub.model_family(model) == ('pyramid' if hasattr(model, 'stages') else 'deit')
    # constructor_args is the model's own model_args(), and rebuilds the same architecture
    assert hub.constructor_args(model) == model.model_args()
    rebuilt = timm.create_model(name, device='meta', **hub.constructor_args(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_model_family_rejects_others():
    assert hub.model_family('reactdeit') == 'deit' and hub.model_family('binaryvit') == 'pyramid'
    with pytest.raises(ValueError, match='not one of timm_binaryvit'):
        hub.model_family('resnet18')
    with pytest.raises(ValueError, match='unknown model'):
        hub.model_family('no_such_model')
    with pytest.raises(TypeError, match='not a BinaryViT or BinaryDeiT'):
        hub.model_family(torch.nn.Linear(2, 2))


def test_save_pretrained_refuses_what_it_cannot_rebuild(tmp_path):
    model = timm.create_model('binaryvit', **PYRAMID)
    model.stages = model.stages[:2]  # what prune_intermediate_layers(indices=(0, 1)) leaves
    with pytest.raises(ValueError, match='pruned'):
        hub.save_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match='not a BinaryViT or BinaryDeiT'):
        hub.save_pretrained(timm.create_model('binary_deit_small_gap_patch16_224', features_only=True, out_indices=1,
                                              **DEIT),
                            tmp_path)
    with pytest.raises(ValueError, match='does not have the state dict'):
        hub.save_pretrained(timm.create_model('binaryvit', **PYRAMID), tmp_path, model_args=dict(depths=[2, 1, 1, 1]))


def test_push_to_hf_hub_uploads_a_loadable_repo(tmp_path, monkeypatch):
    """timm's push_to_hf_hub and our push_to_hub, with the upload captured instead of sent."""
    import huggingface_hub
    import timm.models._hub as timm_hub

    uploads = {}

    class FakeApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def file_exists(self, *args, **kwargs):
            return False

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads[repo_id] = tmp_path / repo_id.replace('/', '--')
            shutil.copytree(folder_path, uploads[repo_id])
            return 'commit-info'

    monkeypatch.setattr(timm_hub, 'HfApi', FakeApi)
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    model = make_model('binary_deit_small_gap_mb_affine_patch16_224')
    x = example_input(model)
    timm.models.push_to_hf_hub(model, f'{ORG}/pushed-timm', model_args=hub.constructor_args(model))
    assert hub.push_to_hub(model, f'{ORG}/pushed-ours') == 'commit-info'
    assert {'model.safetensors', 'pytorch_model.bin', 'config.json', 'README.md'} <= \
        {p.name for p in uploads[f'{ORG}/pushed-timm'].iterdir()}
    card = (uploads[f'{ORG}/pushed-ours'] / 'README.md').read_text()
    assert f"hf-hub:{ORG}/pushed-ours" in card
    for folder in uploads.values():
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
        assert torch.equal(logits(loaded, x), logits(model, x))


def test_model_card(tmp_path):
    model = make_model('binaryvit_small_fpembed_patch4_224')
    hub.save_pretrained(model, tmp_path, model_card=dict(source='trained on nothing, for a test',
                                                         repo_id=f'{ORG}/card'))
    card = (tmp_path / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card and 'license: apache-2.0' in card
    for text in ('2306.16678', 'CVPR 2023 Workshops', 'Le', model_card.PAPER_TITLE,
                 'binaryvit_small_fpembed_patch4_224', 'full-precision stage transitions',
                 'trained on nothing, for a test', f'hf-hub:{ORG}/card', '`embed_dims`'):
        assert text in card, text


# ---------------------------------------------------------------------------------------------
# Broken local folders (in process)

LOCAL_CASES = {
    'unknown-arch': ('config.json', 'no_such_model_xyz'),
    'truncated': ('model.safetensors', 'truncated'),
    'wrong-weights': ('model.safetensors', 'does not hold weights', 'missing'),
    'config-only': ('model.safetensors', 'no weights file'),
}


@pytest.mark.parametrize('case', sorted(LOCAL_CASES))
def test_broken_local_folder(repos, case):
    folder = repos['dir'] / case
    file, *words = LOCAL_CASES[case]
    with pytest.raises(Exception) as plain:  # plain timm must not load it
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert not isinstance(plain.value, AssertionError)
    with pytest.raises(hub.LoadError) as err:
        hub.load_model(f'local-dir:{folder}')
    message = str(err.value)
    assert str(folder) in message and file in message, message
    for word in words:
        assert word in message, message
    assert err.value.file and file in err.value.file
    if case in ('truncated', 'wrong-weights'):
        assert err.value.__cause__ is not None  # the original error stays reachable


def test_wrong_weights_error_names_the_keys(repos):
    with pytest.raises(ValueError, match='does not fit') as plain:
        timm.create_model(f'local-dir:{repos["dir"] / "wrong-weights"}', pretrained=True)
    assert 'blocks.0' in str(plain.value) or 'stages.' in str(plain.value)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(hub.LoadError, match='does not exist'):
        hub.load_model(f'local-dir:{tmp_path / "nowhere"}')
    with pytest.raises(hub.LoadError, match='config.json: missing'):
        hub.load_model(f'local-dir:{tmp_path}')
    (tmp_path / 'config.json').write_text('{"architecture": ')
    with pytest.raises(hub.LoadError, match='config.json: is not valid JSON'):
        hub.load_model(f'local-dir:{tmp_path}')
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'binaryvit', 'model_args': {'depths': [1]}}))
    with pytest.raises(hub.LoadError, match='do not build binaryvit'):
        hub.load_model(f'local-dir:{tmp_path}')
    with pytest.raises(ValueError, match='unknown model'):
        hub.load_model('not_a_model_or_folder')


# ---------------------------------------------------------------------------------------------
# The Hub client: offline cache and local HTTP server (subprocesses)

OFFLINE_CASES = {
    'not-cached': ('config.json', 'HF_HUB_OFFLINE', 'not in the local'),
    'config-only': ('model.safetensors', 'offline'),
    'unknown-arch': ('config.json', 'no_such_model_xyz'),
    'truncated': ('model.safetensors', 'truncated'),
    'wrong-weights': ('model.safetensors', 'does not hold weights', 'missing'),
}
HTTP_CASES = {
    'not-on-the-hub': ('config.json', 'does not exist'),
    'config-only': ('model.safetensors', 'no weights file'),
    'unknown-arch': ('config.json', 'no_such_model_xyz'),
    'truncated': ('model.safetensors', 'truncated'),
    'wrong-weights': ('model.safetensors', 'does not hold weights', 'missing'),
}


@pytest.mark.slow
def test_offline_hf_cache(repos, tmp_path):
    hf_home = tmp_path / 'hf_home'
    for folder in repos['dir'].iterdir():
        if folder.name != 'inputs':
            build_hf_cache(hf_home / 'hub', f'{ORG}/{folder.name}', repo_files(folder))
    jobs = model_jobs(repos) + error_jobs(repos, sorted(OFFLINE_CASES))
    results, outputs = run_loader(tmp_path, hf_env(hf_home, offline=True), jobs, 'offline')
    assert results['__env__']['offline'] is True
    assert results['__env__']['cache'] == str(hf_home / 'hub')
    check_models(repos, results, outputs)
    check_errors(results, OFFLINE_CASES)


@pytest.mark.slow
def test_local_hub_server_then_offline(repos, hub_server, tmp_path):
    endpoint = f'http://127.0.0.1:{hub_server.server_address[1]}'
    hf_home = tmp_path / 'hf_home'
    jobs = model_jobs(repos) + error_jobs(repos, sorted(HTTP_CASES))
    results, outputs = run_loader(tmp_path, hf_env(hf_home, offline=False, endpoint=endpoint), jobs, 'online')
    assert results['__env__']['endpoint'] == endpoint and results['__env__']['offline'] is False
    check_models(repos, results, outputs)
    check_errors(results, HTTP_CASES)
    requests = set(hub_server.requests)
    for name in REGISTERED:
        for method in ('HEAD', 'GET'):
            for file in ('config.json', 'model.safetensors'):
                assert (method, f'/{ORG}/{name}/resolve/main/{file}') in requests

    # the client's downloads form the cache layout the offline test builds by hand ...
    folder = hf_home / 'hub' / f'models--{ORG}--binaryvit'
    assert (folder / 'refs' / 'main').read_text() == COMMIT
    data = (repos['dir'] / 'binaryvit' / 'model.safetensors').read_bytes()
    assert (folder / 'blobs' / hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert (folder / 'snapshots' / COMMIT / 'model.safetensors').read_bytes() == data
    # ... and load again with the network off
    results, outputs = run_loader(tmp_path, hf_env(hf_home, offline=True), model_jobs(repos), 'offline-after')
    check_models(repos, results, outputs)
