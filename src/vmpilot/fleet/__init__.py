"""Run a vmpilot test suite over a fleet of hosts (pytest-xdist over ssh).

`pytest --vmpilot-hosts local,build2,user@lab3:2222` provisions each remote
host (a venv in `~/.cache/vmpilot/fleet` there, the wheels built or re-packed
here, the test files), checks its QEMU, and runs xdist workers there. See
`plugin` (options and hooks), `controller` (provisioning and the end of the
run), `session` (xdist's session, node manager and worker, adapted),
`bundle` (wheels and test files), `_remote` (what runs on a host).
"""
