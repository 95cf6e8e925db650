package e2e

// The container runtime, emulated. With MICROBATCH_E2E_IMAGE set (the
// directory deploy/image/build.sh prints: the image's filesystem exported,
// and its config), every container runs from the image as a runtime would
// run it: the image's entrypoint and command (the container's command and
// args replace them), the image's environment under the container's, the
// user the pod's securityContext names (or the image's), the working
// directory, a root filesystem of its own (the image below a writable layer,
// read-only when readOnlyRootFilesystem says so), /proc, a minimal /dev, and
// the pod's volumes (emptyDir as a tmpfs of its sizeLimit; configMap and
// secret as read-only files). Without an image, the local binary runs with
// the container's args, and a volume's files are reached through their host
// directory (variables and args naming a mount path are rewritten to it).
//
// What it does not emulate: network, PID and user namespaces, capabilities
// and seccomp (the process is an ordinary one of this machine with the
// pod's uid), cgroup limits.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"
)

// containerImage is an exported image: its filesystem and its config.
type containerImage struct {
	rootfs string
	config struct {
		User       string
		Env        []string
		Entrypoint []string
		Cmd        []string
		WorkingDir string
	}
}

// loadImage reads what deploy/image/build.sh exported into dir.
func loadImage(dir string) (*containerImage, error) {
	img := &containerImage{rootfs: filepath.Join(dir, "rootfs")}
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("MICROBATCH_E2E_IMAGE: %w (make it with deploy/image/build.sh)", err)
	}
	if err := json.Unmarshal(data, &img.config); err != nil {
		return nil, fmt.Errorf("MICROBATCH_E2E_IMAGE: config.json: %w", err)
	}
	if fi, err := os.Stat(img.rootfs); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("MICROBATCH_E2E_IMAGE: no rootfs directory in %s", dir)
	}
	if len(img.config.Entrypoint) == 0 {
		return nil, fmt.Errorf("MICROBATCH_E2E_IMAGE: the image has no entrypoint")
	}
	return img, nil
}

// argv is the runtime's rule: the container's command replaces the
// entrypoint (and then the image's command is dropped); its args replace
// the image's command.
func (img *containerImage) argv(c corev1.Container) []string {
	argv := append([]string{}, img.config.Entrypoint...)
	cmd := img.config.Cmd
	if len(c.Command) > 0 {
		argv, cmd = append([]string{}, c.Command...), nil
	}
	if len(c.Args) > 0 {
		cmd = c.Args
	}
	return append(argv, cmd...)
}

// identity is the uid and gid the container runs as: the securityContext
// of the container, then the pod's, then the image's USER (numeric only:
// runAsNonRoot cannot check a name, and the kubelet refuses it).
func (img *containerImage) identity(pod *corev1.Pod, c corev1.Container) (uid, gid uint32, err error) {
	var u, g *int64
	nonRoot := false
	if sc := pod.Spec.SecurityContext; sc != nil {
		u, g = sc.RunAsUser, sc.RunAsGroup
		nonRoot = sc.RunAsNonRoot != nil && *sc.RunAsNonRoot
	}
	if sc := c.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			u = sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			g = sc.RunAsGroup
		}
		if sc.RunAsNonRoot != nil {
			nonRoot = *sc.RunAsNonRoot
		}
	}
	imgUser, imgGroup, _ := strings.Cut(img.config.User, ":")
	if u == nil {
		n, perr := strconv.ParseInt(imgUser, 10, 64)
		if perr != nil {
			if nonRoot {
				return 0, 0, fmt.Errorf("container has runAsNonRoot and image has non-numeric user (%s), cannot verify user is non-root", img.config.User)
			}
			n = 0
		}
		u = &n
	}
	if g == nil {
		n, perr := strconv.ParseInt(imgGroup, 10, 64)
		if perr != nil {
			n = int64(img.passwdGroup(uint32(*u))) // the user's primary group
		}
		g = &n
	}
	if nonRoot && *u == 0 {
		return 0, 0, errors.New("container has runAsNonRoot and image will run as root")
	}
	return uint32(*u), uint32(*g), nil
}

// env is the image's environment with the container's on top (later wins).
func (img *containerImage) env(container []string, home string) []string {
	values, order := map[string]string{}, []string{}
	add := func(kv string) {
		k, v, _ := strings.Cut(kv, "=")
		if _, ok := values[k]; !ok {
			order = append(order, k)
		}
		values[k] = v
	}
	for _, kv := range img.config.Env {
		add(kv)
	}
	for _, kv := range container {
		add(kv)
	}
	if _, ok := values["HOME"]; !ok {
		add("HOME=" + home) // runc takes it from the image's /etc/passwd
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+values[k])
	}
	return out
}

// homeOf reads uid's home directory from the image's /etc/passwd.
func (img *containerImage) homeOf(uid uint32) string {
	if f := img.passwdEntry(uid); f != nil {
		return f[5]
	}
	return "/"
}

// passwdGroup reads uid's primary group from the image's /etc/passwd.
func (img *containerImage) passwdGroup(uid uint32) uint32 {
	if f := img.passwdEntry(uid); f != nil {
		if n, err := strconv.ParseUint(f[3], 10, 32); err == nil {
			return uint32(n)
		}
	}
	return 0
}

// passwdEntry is uid's line of the image's /etc/passwd, split, or nil.
func (img *containerImage) passwdEntry(uid uint32) []string {
	f, err := os.Open(filepath.Join(img.rootfs, "etc", "passwd"))
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) >= 6 && fields[2] == strconv.FormatUint(uint64(uid), 10) {
			return fields
		}
	}
	return nil
}

// podVolume is one volume mount of the container, resolved: a tmpfs
// (emptyDir) or a host directory holding the files (configMap, secret).
type podVolume struct {
	mountPath string
	tmpfsSize int64  // emptyDir: the tmpfs's size in bytes
	hostDir   string // configMap, secret: the files, written by the stand-in
	readOnly  bool
}

// containerRoot is one container's filesystem: mounted before the process
// starts, unmounted after it exits.
type containerRoot struct {
	dir  string // upper/work layers and the root below it
	root string
}

// mountRoot builds the container's root under dir: the image's rootfs
// below a writable layer (overlayfs), the mount points made, the root made
// read-only if asked, then /proc, /dev and the volumes mounted on it.
func (img *containerImage) mountRoot(dir string, readOnly bool, volumes []podVolume) (_ *containerRoot, err error) {
	r := &containerRoot{dir: dir, root: filepath.Join(dir, "root")}
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			r.unmount()
		}
	}()
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", img.rootfs, filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	if err := syscall.Mount("overlay", r.root, "overlay", 0, opts); err != nil {
		return nil, fmt.Errorf("mounting the image's root: %w", err)
	}
	points := []string{"/proc", "/dev"}
	for _, v := range volumes {
		points = append(points, v.mountPath)
	}
	for _, p := range points {
		// The host resolves these paths: a symlink in the image (var/run ->
		// /run) would lead the mount out of the root.
		if err := noSymlinkIn(r.root, p); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Join(r.root, p), 0o755); err != nil {
			return nil, fmt.Errorf("mount point %s: %w", p, err)
		}
	}
	if readOnly {
		// A read-only bind of the root onto itself: what is mounted on it
		// next (/proc, /dev, the volumes) keeps its own flags.
		if err := syscall.Mount(r.root, r.root, "", syscall.MS_BIND, ""); err != nil {
			return nil, fmt.Errorf("read-only root: %w", err)
		}
		if err := syscall.Mount("", r.root, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
			return nil, fmt.Errorf("read-only root: %w", err)
		}
	}
	if err := syscall.Mount("proc", filepath.Join(r.root, "proc"), "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		return nil, fmt.Errorf("/proc: %w", err)
	}
	if err := mountDev(filepath.Join(r.root, "dev")); err != nil {
		return nil, fmt.Errorf("/dev: %w", err)
	}
	for _, v := range volumes {
		target := filepath.Join(r.root, v.mountPath)
		if v.hostDir == "" {
			opts := fmt.Sprintf("mode=1777,size=%d", v.tmpfsSize)
			flags := uintptr(syscall.MS_NOSUID | syscall.MS_NODEV)
			if v.readOnly {
				flags |= syscall.MS_RDONLY
			}
			if err := syscall.Mount("tmpfs", target, "tmpfs", flags, opts); err != nil {
				return nil, fmt.Errorf("volume at %s: %w", v.mountPath, err)
			}
			continue
		}
		if err := syscall.Mount(v.hostDir, target, "", syscall.MS_BIND, ""); err != nil {
			return nil, fmt.Errorf("volume at %s: %w", v.mountPath, err)
		}
		if v.readOnly {
			if err := syscall.Mount("", target, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
				return nil, fmt.Errorf("volume at %s: %w", v.mountPath, err)
			}
		}
	}
	return r, nil
}

// noSymlinkIn refuses a mount path with a symbolic link among the parts
// that exist in the root.
func noSymlinkIn(root, path string) error {
	at := root
	for _, part := range strings.Split(strings.Trim(filepath.Clean(path), "/"), "/") {
		at = filepath.Join(at, part)
		fi, err := os.Lstat(at)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("mount path %s: %s is a symbolic link in the image; the stand-in does not follow links in mount paths", path, strings.TrimPrefix(at, root))
		}
	}
	return nil
}

// mountDev is a runtime's minimal /dev: a tmpfs with the host's null, zero,
// full, random, urandom and tty bound in, and the fd links.
func mountDev(dev string) error {
	if err := syscall.Mount("tmpfs", dev, "tmpfs", syscall.MS_NOSUID, "mode=755,size=64k"); err != nil {
		return err
	}
	for _, name := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		target := filepath.Join(dev, name)
		if err := os.WriteFile(target, nil, 0o666); err != nil {
			return err
		}
		if err := syscall.Mount("/dev/"+name, target, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	for name, to := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		if err := os.Symlink(to, filepath.Join(dev, name)); err != nil {
			return err
		}
	}
	return nil
}

// unmount detaches the root and everything mounted on it, then removes the
// container's layers.
func (r *containerRoot) unmount() {
	for i := 0; i < 8; i++ { // the read-only bind, then the overlay
		if syscall.Unmount(r.root, syscall.MNT_DETACH) != nil {
			break
		}
	}
	_ = os.RemoveAll(r.dir)
}

// rootOf tells, from /proc, the uid a process runs as and whether its
// root filesystem is read-only: evidence from outside the process.
func rootOf(pid int) (uid string, readOnly bool, err error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", false, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Uid:" {
			uid = f[1]
		}
	}
	info, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return "", false, err
	}
	// The process sees its root as "/": the last mount there is on top.
	for _, line := range strings.Split(string(info), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[4] == "/" {
			readOnly = strings.Contains(","+f[5]+",", ",ro,")
		}
	}
	return uid, readOnly, nil
}
