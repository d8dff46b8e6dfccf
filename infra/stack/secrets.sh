# Secrets of the local stack, kept in STACK_DIR with mode 0600. Sourced by infra/stack/up.sh; checked by
# tests/unit/test_stack_secrets.py.

# stack_secret FILE: print the secret kept in FILE, made from /dev/urandom (32 bytes, hex) on the first call and
# the same on every later one, so `make stack` restarts keep it and shells that sourced .stack/env stay valid.
stack_secret() {
  local file=$1 tmp
  if [ ! -s "$file" ]; then
    tmp="$(mktemp "$file.XXXXXX")"  # mktemp creates it 0600: never readable by others, not even for a moment
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$tmp"
    mv -f "$tmp" "$file"
  fi
  chmod 600 "$file"
  cat "$file"
}

# write_private FILE: write stdin to FILE with mode 0600, through a temporary file and a rename (an existing
# FILE of another mode, from an older up.sh, is replaced, not rewritten in place).
write_private() {
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  mv -f "$tmp" "$1"
}
