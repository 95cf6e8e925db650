package check

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	digest "github.com/opencontainers/go-digest"
)

// offlineImages stands in for the registry: BuildKit's lint resolves each
// FROM image's config; here every base image is an empty Linux image, so
// the lint runs without network.
type offlineImages struct{}

func (offlineImages) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	cfg := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":[]}}`)
	return ref, digest.FromBytes(cfg), cfg, nil
}

// TestDockerfileBuildCheck runs the checks of `docker build --check` (BuildKit's
// DockerfileLint over every stage; the Dockerfile's `# check=experimental=all`
// directive turns on the experimental rules too). Any warning fails.
func TestDockerfileBuildCheck(t *testing.T) {
	dt := []byte(readFile(t, filepath.Join(repoRoot(t), "deploy", "Dockerfile")))
	sm := llb.NewSourceMap(nil, "deploy/Dockerfile", "Dockerfile", dt)
	sm.Definition = &llb.Definition{}
	opt := dockerfile2llb.ConvertOpt{MetaResolver: offlineImages{}, SourceMap: sm}
	res, err := dockerfile2llb.DockerfileLint(context.Background(), dt, opt)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(dt, []byte("\n# check=experimental=all\n")) {
		t.Errorf("deploy/Dockerfile: keep the `# check=experimental=all` directive on line 2")
	}
	if res.Error != nil {
		t.Errorf("deploy/Dockerfile: %s", res.Error.Message)
	}
	for _, w := range res.Warnings {
		line := int32(0)
		if w.Location != nil && len(w.Location.Ranges) > 0 {
			line = w.Location.Ranges[0].Start.Line
		}
		t.Errorf("deploy/Dockerfile:%d: %s: %s", line, w.RuleName, w.Detail)
	}
}

// The Dockerfile cannot be built here (no Docker engine). This parses it
// with BuildKit's own parser and parse-time lint rules, and checks what the
// Kubernetes manifests rely on.
func TestDockerfile(t *testing.T) {
	root := repoRoot(t)
	src := readFile(t, filepath.Join(root, "deploy", "Dockerfile"))
	ast, err := parser.Parse(bytes.NewReader([]byte(src)))
	if err != nil {
		t.Fatalf("deploy/Dockerfile does not parse: %v", err)
	}
	for _, w := range ast.Warnings {
		t.Errorf("parser warning: %s", w.Short)
	}
	var lintWarnings []string
	lint := linter.New(&linter.Config{
		ExperimentalAll: true,
		Warn: func(rule, desc, url, msg string, loc []parser.Range) {
			line := 0
			if len(loc) > 0 {
				line = loc[0].Start.Line
			}
			lintWarnings = append(lintWarnings, fmt.Sprintf("line %d: %s: %s", line, rule, msg))
		},
	})
	stages, metaArgs, err := instructions.Parse(ast.AST, lint)
	if err != nil {
		t.Fatalf("deploy/Dockerfile: %v", err)
	}
	for _, w := range lintWarnings {
		t.Errorf("lint: %s", w)
	}
	args := map[string]string{}
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			if kv.Value == nil {
				t.Errorf("ARG %s has no default: the build would need --build-arg", kv.Key)
			} else {
				args[kv.Key] = *kv.Value
			}
		}
	}
	expand := func(s string) string {
		for k, v := range args {
			s = strings.ReplaceAll(s, "${"+k+"}", v)
		}
		return s
	}
	if len(stages) < 2 {
		t.Fatalf("want a multi-stage build, got %d stage(s)", len(stages))
	}
	final := stages[len(stages)-1]
	base := expand(final.BaseName)
	if !strings.HasPrefix(base, "gcr.io/distroless/cc-debian12") {
		t.Errorf("runtime base %q: want gcr.io/distroless/cc-debian12 (glibc, libssl3, CA certificates, no shell)", base)
	}
	builderBase := expand(stages[0].BaseName)
	if !strings.Contains(builderBase, "bookworm") {
		t.Errorf("builder base %q: build on Debian 12 (bookworm), the runtime's glibc and libssl3", builderBase)
	}

	var user, entrypoint string
	var cmd []string
	var exposed []string
	copiedBinary := false
	for _, c := range final.Commands {
		switch c := c.(type) {
		case *instructions.UserCommand:
			user = c.User
		case *instructions.EntrypointCommand:
			if !c.PrependShell && len(c.CmdLine) > 0 {
				entrypoint = strings.Join(c.CmdLine, " ")
			} else {
				t.Errorf("ENTRYPOINT must be exec form (there is no shell in the image)")
			}
		case *instructions.CmdCommand:
			if c.PrependShell {
				t.Errorf("CMD must be exec form (there is no shell in the image)")
			}
			cmd = c.CmdLine
		case *instructions.ExposeCommand:
			exposed = append(exposed, c.Ports...)
		case *instructions.CopyCommand:
			if c.From != "" && c.DestPath == "/usr/local/bin/microbatch" {
				copiedBinary = true
			}
		case *instructions.RunCommand:
			t.Errorf("RUN in the runtime stage: the distroless image has no shell")
		}
	}
	if entrypoint != "/usr/local/bin/microbatch" {
		t.Errorf("ENTRYPOINT %q, want [\"/usr/local/bin/microbatch\"] (monitor.sh execs it)", entrypoint)
	}
	if !slices.Equal(cmd, []string{"run"}) {
		t.Errorf("CMD %v, want [\"run\"]", cmd)
	}
	if !copiedBinary {
		t.Errorf("the runtime stage does not COPY --from a build stage to /usr/local/bin/microbatch")
	}
	uid, _, _ := strings.Cut(user, ":")
	if n, err := strconv.Atoi(uid); err != nil || n != dockerfileUser {
		t.Errorf("USER %q: want numeric %d (runAsNonRoot can only verify a numeric user; the pods set runAsUser %d)",
			user, dockerfileUser, dockerfileUser)
	}
	f := loadFacts(t)
	for _, p := range []string{strconv.Itoa(f.defaultHTTPPort), "9090"} {
		if !slices.Contains(exposed, p) {
			t.Errorf("EXPOSE lacks %s (exposed: %v)", p, exposed)
		}
	}

	// The dependency layer: cargo chef cook (Cargo.toml/Cargo.lock only)
	// comes before the sources are copied into the build stage.
	var builder *instructions.Stage
	for i := range stages {
		for _, c := range stages[i].Commands {
			if r, ok := c.(*instructions.RunCommand); ok && strings.Contains(strings.Join(r.CmdLine, " "), "cargo build --release") {
				builder = &stages[i]
			}
		}
	}
	if builder == nil {
		t.Fatal("no stage runs `cargo build --release`")
	}
	cook, copyAll, build := -1, -1, -1
	for i, c := range builder.Commands {
		switch c := c.(type) {
		case *instructions.RunCommand:
			line := strings.Join(c.CmdLine, " ")
			if strings.Contains(line, "cargo chef cook") && cook < 0 {
				cook = i
			}
			if strings.Contains(line, "cargo build --release") {
				build = i
				if !strings.Contains(line, "--locked") || !strings.Contains(line, "-p microbatch") {
					t.Errorf("build with --locked -p microbatch: %q", line)
				}
			}
		case *instructions.CopyCommand:
			if c.From == "" && slices.Equal(c.SourcePaths, []string{"."}) && copyAll < 0 {
				copyAll = i
			}
		}
	}
	if !(cook >= 0 && cook < copyAll && copyAll < build) {
		t.Errorf("builder stage: want `cargo chef cook` (cached dependency layer), then COPY . ., then cargo build (got %d, %d, %d)", cook, copyAll, build)
	}
	if !strings.Contains(src, "deploy/image/build.sh") {
		t.Errorf("the Dockerfile must say how it is checked (deploy/image/build.sh)")
	}

	// The build context: small, and never the local broker's secrets.
	ignore := strings.Fields(stripComments(readFile(t, filepath.Join(root, ".dockerignore"))))
	for _, must := range []string{".git", "target", ".kafka-local"} {
		if !slices.Contains(ignore, must) {
			t.Errorf(".dockerignore lacks %s", must)
		}
	}
	for _, keep := range []string{"crates", "Cargo.toml", "Cargo.lock"} {
		if slices.Contains(ignore, keep) {
			t.Errorf(".dockerignore excludes %s, which the build needs", keep)
		}
	}
}
