"""The model registry: versions of fine-tuned adapters (or merged models), promotion, rollback, verification.

    import lora_engine as le
    with le.registry.Registry("/srv/models") as reg:      # the folder; default $LORA_ENGINE_REGISTRY
        reg.publish("runs/chat", "chat")                   # {"ref": "chat@v1", ...}
        reg.promote("chat@v1", "production", reason="beats v0")
    le.registry.resolve_ref("registry:chat@production")  # the verified local adapter folder

The parts, bottom up (all standard library; the store sits low, so loaders can resolve references):

  names.py     names and references (NAME@vN, NAME@STAGE), RegistryError, the default folder
  keys.py      the key file: keygen, read_key, fingerprint, HMAC signatures
  rows.py      registry.db's rows read into checked types (a damaged row is one RegistryError)
  objects.py   stored files: no symbolic links, read-only modes, interrupted publishes recovered
  history.py   the hash chain of promotions and rollbacks, its signatures and the key's adoption
  runfolder.py what a training run folder contributes to a version (checked run.json, files)
  store.py     Registry: publish, list, show, diff, promote, rollback, sign, resolve
  checks.py    verify: every stored hash, stray file and history entry
  refs.py      registry references wherever a path is taken (resolve_ref, local_path, resolve_fields)
  command.py   `python -m lora_engine.registry` (imported only by __main__.py: it sits on top)
"""

from lora_engine.registry.keys import fingerprint, keygen, read_key
from lora_engine.registry.names import (
                                        DEFAULT_MAX_REGRESSION,
                                        KEY_ENV,
                                        PREFIX,
                                        ROOT_ENV,
                                        STAGES,
                                        RegistryError,
                                        check_name,
                                        content_digest,
                                        default_root,
                                        parse_ref,
)
from lora_engine.registry.refs import local_path, resolve_fields, resolve_ref
from lora_engine.registry.store import Registry, general_regression

__all__ = ["DEFAULT_MAX_REGRESSION", "KEY_ENV", "PREFIX", "ROOT_ENV", "STAGES", "Registry", "RegistryError",
           "check_name", "content_digest", "default_root", "fingerprint", "general_regression", "keygen",
           "local_path", "parse_ref", "read_key", "resolve_fields", "resolve_ref"]
