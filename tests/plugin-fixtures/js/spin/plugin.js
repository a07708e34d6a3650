/** A router whose `route` never returns: the host's epoch deadline must stop it. */
export function configure(_config) {}

export function route(_request, _targets) {
  let n = 0;
  for (;;) {
    n = (n + 1) | 0;
  }
}
