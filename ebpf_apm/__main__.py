"""`python -m ebpf_apm ...` is the `ebpf-apm` command."""

import sys

from ebpf_apm.cli import main

sys.exit(main())
