"""`resnet-serve`: serve an exported model over gRPC (settings from flags, RESNET_SERVE_* or a config file)."""

from __future__ import annotations

import sys

from resnet_serve.common.cli import fail, quiet_frameworks, setup_logging
from resnet_serve.common.malloc import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    from resnet_serve.common.modeldir import ModelDirError

    from .settings import load_settings

    setup_logging()
    from .auth import load_tokens

    try:
        settings = load_settings(argv)
        load_tokens(settings.auth_token_file)  # a configured token source that yields no token: refuse now
    except (ValueError, OSError) as e:
        return fail(str(e))
    quiet_frameworks(settings.verbose)  # before the engine workers (where Paddle runs) are started
    keep_freed_memory()  # each front process sets it for itself (front_process.py); workers do not
    if settings.device == "gpu":
        from .trt_cache import gpu_support_problem

        problem = gpu_support_problem(settings.engine)
        if problem:
            return fail(problem)
    from .app import ListenError, main_with
    from .front_process import front_main

    try:
        return main_with(settings, front_main)
    except (ModelDirError, ListenError) as e:
        return fail(str(e))
    except OSError as e:
        if e.filename is None:  # not a file the settings named: a real failure, with its traceback
            raise
        return fail(f"cannot read {e.filename} ({e.strerror}): check the file settings (--tls-cert, --tls-key, "
                    f"--tls-client-ca, --auth-token-file)")


if __name__ == "__main__":
    sys.exit(main())
