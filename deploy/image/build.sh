#!/usr/bin/env bash
# build.sh - build deploy/Dockerfile without a Docker engine or a registry,
# and export the image's filesystem so that it can be run with chroot.
#
# The Dockerfile's base images come from registries; here they are made from
# Debian packages with mmdebstrap and imported into podman:
#   RUNTIME_IMAGE  what gcr.io/distroless/cc-debian12:nonroot holds, and no
#                  more: glibc, libgcc_s, libstdc++, libgomp, libssl3, CA
#                  certificates, tzdata, netbase, base-files, and the users
#                  root, nobody and nonroot (65532). No shell.
#   RUST_IMAGE     Debian 12 (minbase, with apt) and this machine's Rust
#                  toolchain, as rust:1-bookworm has them (only without --binary).
# Then podman builds the Dockerfile itself (vfs storage, chroot isolation).
#
# Usage: deploy/image/build.sh [--binary PATH] [--print-dir]
#   --binary PATH  build the Dockerfile's runtime stage around PATH (the
#                  binary the test command built) instead of compiling the
#                  workspace: the runtime stage, as the Dockerfile has it,
#                  copies from an image holding PATH in place of the builder.
#                  Without it the whole Dockerfile is built (tens of minutes
#                  on two cores: every crate and librdkafka in release mode).
#   --print-dir    print the output directory if that image is already
#                  exported (exit 1 if not); build nothing
# Output, printed on stdout: a directory holding
#   rootfs/      the image's filesystem, exported
#   config.json  the image's config (Entrypoint, Cmd, Env, User, WorkingDir)
#   size         the image's size in bytes, as podman reports it
# Everything is cached outside the clone (MICROBATCH_IMAGE_CACHE, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-image): the bases keyed by this
# script, the image keyed by the Dockerfile, the bases and the binary (or the
# sources), so a second run builds nothing.
# Needs root, podman and mmdebstrap (Debian: apt-get install podman mmdebstrap).
set -euo pipefail

IMAGE_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$IMAGE_DIR/../.." && pwd)
CACHE=${MICROBATCH_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-image}
SUITE=bookworm # the Debian release of both public base images
# A store of its own (vfs: no kernel overlay needed), so that nothing here
# touches, prunes or reconfigures the machine's other podman images.
PODMAN=(podman --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)
umask 022

log() { printf 'image build: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

binary="" print_dir=false
while [ $# -gt 0 ]; do
	case $1 in
	--binary) [ $# -ge 2 ] || { log "--binary needs a path"; exit 2; }; binary=$2; shift 2 ;;
	--binary=*) binary=${1#--binary=}; shift ;;
	--print-dir) print_dir=true; shift ;;
	-h | --help) usage ;;
	*) log "unknown argument: $1 (see --help)"; exit 2 ;;
	esac
done
if [ -n "$binary" ] && { [ ! -f "$binary" ] || [ ! -x "$binary" ]; }; then
	log "--binary $binary: not an executable file"
	exit 2
fi

sha() { sha256sum | cut -c1-16; }
# The bases change when this script does (it says what they hold).
BASE_KEY=$(sha <"${BASH_SOURCE[0]}")
RUNTIME_BASE=localhost/microbatch-runtime-base:$BASE_KEY

if [ -n "$binary" ]; then
	source_key=$(sha <"$binary")
else
	RUST_BASE=localhost/microbatch-rust-base:$BASE_KEY-$(rustc --version | sha)
	# The sources as they are in the work tree (what `COPY . .` takes),
	# and the toolchain.
	source_key=$( (rustc --version
		git -C "$REPO" ls-files -z --cached --others --exclude-standard | sort -z \
			| while IFS= read -r -d '' f; do
				if [ -f "$REPO/$f" ]; then sha256sum "$REPO/$f"; fi
			done) | sha)
fi
IMAGE_KEY=$(cat "$REPO/deploy/Dockerfile" "$REPO/.dockerignore" <(echo "$BASE_KEY $source_key ${binary:+binary}") | sha)
OUT=$CACHE/image-$IMAGE_KEY

if [ -s "$OUT/size" ]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi
$print_dir && exit 1

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, podman's vfs storage and the export keep file owners)"
for tool in podman mmdebstrap; do
	command -v "$tool" >/dev/null || die "$tool is missing (Debian: apt-get install podman mmdebstrap)"
done
mkdir -p "$CACHE"
# One build at a time per cache.
exec 9>"$CACHE/lock"
flock 9
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
tag=localhost/microbatch:$IMAGE_KEY binary_image=""
# Podman's copies are dropped whatever happens: the exported tree is what
# the tests use, and vfs storage keeps a full copy per layer.
cleanup() {
	"${PODMAN[@]}" rmi --force "$tag" ${binary_image:+"$binary_image"} >/dev/null 2>&1 || true
	"${PODMAN[@]}" image prune --force >/dev/null 2>&1 || true # this store's only
	rm -rf "$WORK"
}
trap cleanup EXIT

# The files of these packages make the runtime base (distroless cc-debian12's
# package set); everything else mmdebstrap installs is left out.
RUNTIME_PACKAGES=(base-files netbase tzdata libc6 libgcc-s1 libstdc++6 libgomp1 libssl3)

# import_tree DIR IMAGE CHANGES...: DIR's tree as a one-layer image.
import_tree() {
	local dir=$1 image=$2
	shift 2
	local changes=()
	for c in "$@"; do changes+=(--change "$c"); done
	tar --numeric-owner -C "$dir" -cf - . | "${PODMAN[@]}" import "${changes[@]}" - "$image" >/dev/null
}

make_runtime_base() {
	local staging=$WORK/runtime-staging root=$WORK/runtime-root
	log "runtime base: mmdebstrap $SUITE (${RUNTIME_PACKAGES[*]}, ca-certificates)"
	mmdebstrap --quiet --variant=minbase --include="ca-certificates,$(IFS=,; echo "${RUNTIME_PACKAGES[*]}")" \
		"$SUITE" "$staging"
	# Each package's files, with the parent directories resolved through the
	# merged-/usr links, so that the new tree holds one real copy.
	chroot "$staging" dpkg-query -L "${RUNTIME_PACKAGES[@]}" | python3 -c '
import os, sys
root = sys.argv[1]
seen = set()
for line in sys.stdin:
    path = line.strip()
    if not path.startswith("/") or path.startswith("/."):
        continue
    parent = os.path.realpath(root + os.path.dirname(path))
    full = os.path.join(parent, os.path.basename(path))
    if os.path.lexists(full):
        rel = os.path.relpath(full, root)
        if rel not in seen:
            seen.add(rel)
            print(rel)
' "$staging" >"$WORK/runtime-files"
	# ca-certificates' bundle is made by its maintainer script; the
	# merged-/usr links and the directories base-files' script makes.
	printf '%s\n' etc/ssl/certs/ca-certificates.crt bin lib lib64 sbin run var/run var/tmp >>"$WORK/runtime-files"
	mkdir -p "$root"
	tar -C "$staging" --numeric-owner -cf - --no-recursion -T "$WORK/runtime-files" | tar -C "$root" -xf -
	install -d -m 1777 "$root/tmp"
	install -d -m 0700 "$root/root"
	install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
	cat >"$root/etc/passwd" <<-'EOF'
		root:x:0:0:root:/root:/sbin/nologin
		nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
		nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
	EOF
	cat >"$root/etc/group" <<-'EOF'
		root:x:0:
		nobody:x:65534:
		tty:x:5:
		staff:x:50:
		nonroot:x:65532:
	EOF
	printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
	if [ -e "$root/bin/sh" ] || [ -e "$root/usr/bin/sh" ]; then die "runtime base: a shell got in"; fi
	import_tree "$root" "$RUNTIME_BASE" \
		"ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		"ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
		"USER 65532" "WORKDIR /home/nonroot"
	log "runtime base: $RUNTIME_BASE ($(du -sh "$root" | cut -f1))"
	drop_other_tags "${RUNTIME_BASE%:*}" "$RUNTIME_BASE"
}

# drop_other_tags REPO KEEP: older bases (another key) are removed.
drop_other_tags() {
	"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' | grep "^$1:" | grep -vxF "$2" \
		| xargs -r "${PODMAN[@]}" rmi --force >/dev/null 2>&1 || true
}

make_rust_base() {
	local staging=$WORK/rust-staging sysroot
	sysroot=$(rustc --print sysroot)
	log "builder base: mmdebstrap $SUITE (minbase) and $(rustc --version)"
	mmdebstrap --quiet --variant=minbase --include=ca-certificates "$SUITE" "$staging"
	# The build reaches package registries as this machine does: through
	# the same local CA certificates (a proxy's, if there is one).
	if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
		cp /usr/local/share/ca-certificates/*.crt "$staging/usr/local/share/ca-certificates/"
		chroot "$staging" update-ca-certificates >/dev/null
	fi
	mkdir -p "$staging/usr/local/rust" "$staging/usr/local/cargo/bin"
	cp -a "$sysroot/." "$staging/usr/local/rust/"
	rm -rf "$staging/usr/local/rust/share/doc"
	import_tree "$staging" "$RUST_BASE" \
		"ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		"ENV CARGO_HOME=/usr/local/cargo"
	drop_other_tags "${RUST_BASE%:*}" "$RUST_BASE"
}

"${PODMAN[@]}" image exists "$RUNTIME_BASE" || make_runtime_base

build_args=(--build-arg "RUNTIME_IMAGE=$RUNTIME_BASE")
dockerfile=$REPO/deploy/Dockerfile
if [ -n "$binary" ]; then
	# An image holding /out/microbatch and nothing else (its debug sections
	# compressed as the builder stage does) stands in for the builder: the
	# Dockerfile's global ARGs, then that image named "builder", then the
	# runtime stage to the end of the file, unchanged.
	mkdir -p "$WORK/binary/out"
	objcopy --compress-debug-sections=zlib "$binary" "$WORK/binary/out/microbatch"
	binary_image=localhost/microbatch-binary:$source_key
	import_tree "$WORK/binary" "$binary_image"
	dockerfile=$WORK/Dockerfile.runtime
	awk -v builder="$binary_image" '
		/^FROM / && !seen { seen = 1; print "FROM " builder " AS builder" }
		!seen && /^ARG / { print }
		/^FROM \$\{RUNTIME_IMAGE\} AS runtime$/ { runtime = 1 }
		runtime { print }
	' "$REPO/deploy/Dockerfile" >"$dockerfile"
	# shellcheck disable=SC2016 # a literal line of the Dockerfile
	grep -qxF 'FROM ${RUNTIME_IMAGE} AS runtime' "$dockerfile" \
		|| die "deploy/Dockerfile has no line 'FROM \${RUNTIME_IMAGE} AS runtime'"
else
	"${PODMAN[@]}" image exists "$RUST_BASE" || make_rust_base
	build_args+=(--build-arg "RUST_IMAGE=$RUST_BASE")
fi

log "podman build -f deploy/Dockerfile${binary:+ (its runtime stage)} ${build_args[*]}"
start=$SECONDS
# --layers=false: one commit per stage, not per step; with vfs storage each
# commit is a full copy, and the builder's target directory is gigabytes.
"${PODMAN[@]}" build --isolation chroot --network host --pull=never --layers=false --target runtime \
	-f "$dockerfile" "${build_args[@]}" -t "$tag" "$REPO" >&2
log "built $tag in $((SECONDS - start)) s"

# Export the filesystem (podman create starts nothing) and the config.
container=$("${PODMAN[@]}" create "$tag")
mkdir -p "$WORK/out/rootfs"
"${PODMAN[@]}" export "$container" | tar --numeric-owner -C "$WORK/out/rootfs" -xf -
"${PODMAN[@]}" rm "$container" >/dev/null
"${PODMAN[@]}" image inspect --format '{{json .Config}}' "$tag" >"$WORK/out/config.json"
"${PODMAN[@]}" image inspect --format '{{.Size}}' "$tag" >"$WORK/out/size"

# Fail the build, not the pod: the image's own loader must find every
# library the binary needs.
loader=$(cd "$WORK/out/rootfs" && find usr/lib usr/lib64 -maxdepth 2 -name 'ld-linux*.so.*' -print -quit 2>/dev/null)
[ -n "$loader" ] || die "the image has no dynamic loader (ld-linux*.so.*)"
if ! libs=$(chroot "$WORK/out/rootfs" "/$loader" --list /usr/local/bin/microbatch 2>&1) \
	|| grep -q 'not found' <<<"$libs"; then
	die "the image lacks libraries the binary needs:
$libs"
fi

mv "$WORK/out" "$OUT"
# The three newest exports stay (a test may still be using an older one).
find "$CACHE" -maxdepth 1 -name 'image-*' -type d -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- \
	| while IFS= read -r old; do rm -rf "$old"; done
log "exported to $OUT: $(numfmt --to=iec <"$OUT/size") image; libraries found: $(grep -c '=>' <<<"$libs")"
echo "$OUT"
