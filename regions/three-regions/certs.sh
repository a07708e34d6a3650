#!/usr/bin/env sh
# Makes the three-region cluster's certificates with `meridian certs`: a CA and one certificate per
# node (edge-REGION, engine-REGION), into regions/three-regions/certs/ (git-ignored). Files that
# exist are kept, so it is safe to run again after adding a node.
#
# Every certificate carries its node name, localhost and 127.0.0.1 (enough on one machine: edges
# verify engines by server_name). On three machines, give each region's address too:
#
#   US_EAST_IP=10.0.1.10 EU_WEST_IP=10.0.2.10 AP_SOUTH_IP=10.0.3.10 regions/three-regions/certs.sh
#
# MERIDIAN names the binary (default: `meridian` on PATH); CERTS_DIR the output folder.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${CERTS_DIR:-$here/certs}
meridian=${MERIDIAN:-meridian}

[ -f "$dir/ca.pem" ] || "$meridian" certs ca --dir "$dir"
for region in us-east eu-west ap-south; do
  case $region in
    us-east) ip=${US_EAST_IP:-} ;;
    eu-west) ip=${EU_WEST_IP:-} ;;
    ap-south) ip=${AP_SOUTH_IP:-} ;;
  esac
  for node in "edge-$region" "engine-$region"; do
    [ -f "$dir/$node.pem" ] && continue
    if [ -n "$ip" ]; then
      "$meridian" certs node "$node" --dir "$dir" --dns localhost --ip 127.0.0.1 --ip "$ip"
    else
      "$meridian" certs node "$node" --dir "$dir" --dns localhost --ip 127.0.0.1
    fi
  done
done
echo "certificates in $dir; copy ca.pem and each node's NAME.pem/NAME.key to its machine (never ca.key)"
