/** A router whose `route` throws an uncaught exception (a trap for the host). */
export function configure(_config) {}

export function route(request, _targets) {
  throw new Error(`fixture-exception: deliberate exception for request ${request.requestId}`);
}
