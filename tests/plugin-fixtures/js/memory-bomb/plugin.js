/**
 * A router whose `route` allocates memory without bound until the host's cap stops it.
 *
 * Each allocation is eight times the last (1, 8, 64 MiB…), all kept. JavaScript in the
 * interpreter zeroes memory at about a millisecond per MiB on a busy machine, so a bomb of 1 MiB
 * steps is stopped by the 20 ms deadline before it reaches the 64 MiB cap; growing geometrically,
 * this one asks past the cap within a few milliseconds, and the host must refuse the memory.
 */
export function configure(_config) {}

export function route(_request, _targets) {
  const hoard = [];
  for (let size = 1 << 20; ; size *= 8) {
    hoard.push(new Uint8Array(size));
  }
}
