// Command xdplb-test-apiserver is a small, real Kubernetes API server for xdplb's tests.
//
// It is built from k8s.io/apiserver's generic server (the library kube-apiserver itself is made
// of) with etcd3 storage, so watches, resourceVersions, 410 Gone, paging, label/field selectors,
// bookmarks, streaming lists, all patch types including server-side apply, discovery and OpenAPI
// behave like the real thing. It serves a fixed set of built-in resources (see resources below)
// using the real k8s.io/api types, registered as their own internal version so no conversion code
// is needed. There is no validation, no admission, no RBAC (every request is allowed), no
// controllers and only a little defaulting (Services and EndpointSlices, see defaults.go).
//
// It listens with HTTPS on 127.0.0.1 only, with a self-signed certificate kept in --cert-dir (so
// a restart reuses it), and writes a kubeconfig for that address to --kubeconfig.
//
// See README.md beside this file and build.sh for how it is built.
package main

import (
	"context"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	certutil "k8s.io/client-go/util/cert"
	"k8s.io/component-base/compatibility"
	"k8s.io/klog/v2"

	"xdplbopenapi"
)

// kubeVersion is what /version reports; it matches the k8s.io/* library versions we build with.
const kubeVersion = "1.36.4"

func main() {
	var (
		etcdServers       = flag.String("etcd-servers", "http://127.0.0.1:2379", "comma-separated etcd client URLs")
		etcdPrefix        = flag.String("etcd-prefix", "/registry", "key prefix in etcd")
		bindAddress       = flag.String("bind-address", "127.0.0.1", "address to listen on (keep it on loopback)")
		securePort        = flag.Int("secure-port", 0, "HTTPS port; 0 picks a free one (written to the kubeconfig and --port-file)")
		certDir           = flag.String("cert-dir", "", "directory for the self-signed serving certificate (created if missing, reused if present)")
		kubeconfigPath    = flag.String("kubeconfig", "", "write a kubeconfig for this server here")
		portFile          = flag.String("port-file", "", "write the port actually listened on here")
		watchCache        = flag.Bool("watch-cache", true, "serve lists and watches from the watch cache (like kube-apiserver); false goes to etcd directly")
		compactInterval   = flag.Duration("etcd-compaction-interval", 5*time.Minute, "how often the server compacts etcd (0 disables)")
		eventsHistoryWind = flag.Duration("events-history-window", 0, "minimum window the watch cache keeps events for (0: library default)")
		readyFile         = flag.String("ready-file", "", "write this file once /readyz answers ok (for harnesses without a TLS client)")
		exitOnStdinEOF    = flag.Bool("exit-on-stdin-eof", false, "exit at once when standard input closes (the harness died or let go)")
	)
	if len(os.Args) > 1 && os.Args[1] == "supervise" {
		os.Exit(supervise(os.Args[2:]))
	}
	klog.InitFlags(flag.CommandLine)
	flag.Parse()
	if *exitOnStdinEOF {
		exitWhenStdinCloses(func() { os.Exit(0) })
	}

	if err := run(options{
		etcdServers:     splitComma(*etcdServers),
		etcdPrefix:      *etcdPrefix,
		bindAddress:     *bindAddress,
		securePort:      *securePort,
		certDir:         *certDir,
		kubeconfigPath:  *kubeconfigPath,
		portFile:        *portFile,
		watchCache:      *watchCache,
		compactInterval: *compactInterval,
		eventsWindow:    *eventsHistoryWind,
		readyFile:       *readyFile,
	}); err != nil {
		fmt.Fprintf(os.Stderr, "xdplb-test-apiserver: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	etcdServers     []string
	etcdPrefix      string
	bindAddress     string
	securePort      int
	certDir         string
	kubeconfigPath  string
	portFile        string
	watchCache      bool
	compactInterval time.Duration
	eventsWindow    time.Duration
	readyFile       string
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if i > start {
				out = append(out, s[start:i])
			}
			start = i + 1
		}
	}
	return out
}

func run(o options) error {
	if o.certDir == "" {
		return fmt.Errorf("--cert-dir is required")
	}
	ip := net.ParseIP(o.bindAddress)
	if ip == nil {
		return fmt.Errorf("--bind-address %q is not an IP address", o.bindAddress)
	}

	scheme, externalScheme, err := newSchemes()
	if err != nil {
		return err
	}
	codecs := serializer.NewCodecFactory(scheme)

	// Listen first so that port 0 resolves to a real port before anything is written out.
	ln, err := net.Listen("tcp", net.JoinHostPort(ip.String(), strconv.Itoa(o.securePort)))
	if err != nil {
		return fmt.Errorf("listen on %s:%d: %w", ip, o.securePort, err)
	}
	port := ln.Addr().(*net.TCPAddr).Port

	certFile, keyFile, caPEM, err := ensureServingCert(o.certDir, ip)
	if err != nil {
		return err
	}

	// --- etcd storage -----------------------------------------------------------------------
	var gvs []schema.GroupVersion
	for _, g := range apiGroups {
		gvs = append(gvs, g.gv)
	}
	storageCodec := codecs.LegacyCodec(gvs...)
	etcdOpts := genericoptions.NewEtcdOptions(storagebackend.NewDefaultConfig(o.etcdPrefix, storageCodec))
	etcdOpts.StorageConfig.Transport.ServerList = o.etcdServers
	etcdOpts.StorageConfig.EncodeVersioner = schema.GroupVersions(gvs)
	etcdOpts.StorageConfig.CompactionInterval = o.compactInterval
	if o.eventsWindow > 0 {
		etcdOpts.StorageConfig.EventsHistoryWindow = o.eventsWindow
	}
	etcdOpts.EnableWatchCache = o.watchCache
	// No garbage collector runs here: a foreground/orphan delete would wait forever on its
	// finalizer, so deletes always remove the object at once.
	etcdOpts.EnableGarbageCollection = false

	// --- HTTPS serving ----------------------------------------------------------------------
	sso := genericoptions.NewSecureServingOptions()
	sso.BindAddress = ip
	sso.BindPort = port
	sso.Listener = ln
	sso.ServerCert.CertKey.CertFile = certFile
	sso.ServerCert.CertKey.KeyFile = keyFile

	cfg := genericapiserver.NewRecommendedConfig(codecs)
	cfg.EffectiveVersion = compatibility.NewEffectiveVersionFromString(kubeVersion, "", "")
	cfg.ExternalAddress = net.JoinHostPort(ip.String(), strconv.Itoa(port))
	if err := sso.WithLoopback().ApplyTo(&cfg.SecureServing, &cfg.LoopbackClientConfig); err != nil {
		return fmt.Errorf("secure serving: %w", err)
	}
	if err := etcdOpts.ApplyTo(&cfg.Config); err != nil {
		return fmt.Errorf("etcd options: %w", err)
	}
	// Everyone is an administrator: no authentication, no authorization.
	cfg.Authentication.Authenticator = authenticator.RequestFunc(func(*http.Request) (*authenticator.Response, bool, error) {
		return &authenticator.Response{User: &user.DefaultInfo{
			Name:   "xdplb-test-admin",
			Groups: []string{user.SystemPrivilegedGroup, user.AllAuthenticated},
		}}, true, nil
	})
	cfg.Authorization.Authorizer = authorizerfactory.NewAlwaysAllowAuthorizer()

	// OpenAPI (v2 and v3) from definitions generated by openapi-gen at build time; server-side
	// apply builds its type converter from these.
	namer := openapinamer.NewDefinitionNamer(externalScheme)
	cfg.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(xdplbopenapi.GetOpenAPIDefinitions, namer)
	cfg.OpenAPIConfig.Info.Title = "xdplb-test-apiserver"
	cfg.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(xdplbopenapi.GetOpenAPIDefinitions, namer)
	cfg.OpenAPIV3Config.Info.Title = "xdplb-test-apiserver"

	server, err := cfg.Complete().New("xdplb-test-apiserver", genericapiserver.NewEmptyDelegate())
	if err != nil {
		return fmt.Errorf("new server: %w", err)
	}

	// --- API groups -------------------------------------------------------------------------
	var namespaceStore rest.Creater
	for _, g := range apiGroups {
		info := genericapiserver.NewDefaultAPIGroupInfo(g.gv.Group, scheme, runtime.NewParameterCodec(scheme), codecs)
		storage := map[string]rest.Storage{}
		for _, r := range g.resources {
			mainStorage, status, err := newStorage(scheme, g.gv, r, cfg.RESTOptionsGetter)
			if err != nil {
				return fmt.Errorf("storage for %s: %w", r.plural, err)
			}
			storage[r.plural] = mainStorage
			if status != nil {
				storage[r.plural+"/status"] = status
			}
			if g.gv.Group == "" && r.plural == "namespaces" {
				namespaceStore = mainStorage.(rest.Creater)
			}
		}
		info.VersionedResourcesStorageMap[g.gv.Version] = storage
		if g.gv.Group == "" {
			err = server.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, &info)
		} else {
			err = server.InstallAPIGroup(&info)
		}
		if err != nil {
			return fmt.Errorf("install API group %q: %w", g.gv.String(), err)
		}
	}

	// The namespaces every cluster has; /readyz waits for this hook.
	server.AddPostStartHookOrDie("xdplb-default-namespaces", func(hc genericapiserver.PostStartHookContext) error {
		for _, name := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem, metav1.NamespacePublic, corev1.NamespaceNodeLease} {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
			ctx := genericapirequest.WithNamespace(context.Background(), metav1.NamespaceNone)
			_, err := namespaceStore.Create(ctx, ns, rest.ValidateAllObjectFunc, &metav1.CreateOptions{})
			if err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("create namespace %s: %w", name, err)
			}
		}
		return nil
	})

	if o.kubeconfigPath != "" {
		if err := writeKubeconfig(o.kubeconfigPath, "https://"+net.JoinHostPort(ip.String(), strconv.Itoa(port)), caPEM); err != nil {
			return err
		}
	}
	if o.portFile != "" {
		if err := writeFileAtomic(o.portFile, []byte(strconv.Itoa(port)+"\n"), 0o644); err != nil {
			return err
		}
	}
	url := "https://" + net.JoinHostPort(ip.String(), strconv.Itoa(port))
	klog.Infof("xdplb-test-apiserver serving on %s", url)
	if o.readyFile != "" {
		os.Remove(o.readyFile)
		go signalWhenReady(url, caPEM, o.readyFile)
	}

	ctx := genericapiserver.SetupSignalContext()
	return server.PrepareRun().RunWithContext(ctx)
}

// ensureServingCert makes (or reuses) a CA and a serving certificate for ip and localhost in dir,
// and returns the cert and key file paths and the CA in PEM form.
func ensureServingCert(dir string, ip net.IP) (certFile, keyFile string, caPEM []byte, err error) {
	certFile = filepath.Join(dir, "apiserver.crt")
	keyFile = filepath.Join(dir, "apiserver.key")
	caFile := filepath.Join(dir, "ca.crt")
	if ca, err := os.ReadFile(caFile); err == nil {
		if ok, _ := certutil.CanReadCertAndKey(certFile, keyFile); ok {
			return certFile, keyFile, ca, nil
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", nil, err
	}
	// The certificate comes first, then the CA that signed it.
	certPEM, keyPEM, err := certutil.GenerateSelfSignedCertKey(ip.String(), []net.IP{ip}, []string{"localhost"})
	if err != nil {
		return "", "", nil, fmt.Errorf("generate serving certificate: %w", err)
	}
	first, rest := pem.Decode(certPEM)
	if first == nil {
		return "", "", nil, fmt.Errorf("generated certificate is not PEM")
	}
	caPEM = rest
	if err := writeFileAtomic(keyFile, keyPEM, 0o600); err != nil {
		return "", "", nil, err
	}
	if err := writeFileAtomic(certFile, certPEM, 0o644); err != nil {
		return "", "", nil, err
	}
	if err := writeFileAtomic(caFile, caPEM, 0o644); err != nil {
		return "", "", nil, err
	}
	return certFile, keyFile, caPEM, nil
}

func writeKubeconfig(path, url string, caPEM []byte) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: xdplb-test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: xdplb-test-admin
  user:
    token: xdplb-test-token-not-checked
contexts:
- name: xdplb-test
  context:
    cluster: xdplb-test
    user: xdplb-test-admin
    namespace: default
current-context: xdplb-test
`, url, base64.StdEncoding.EncodeToString(caPEM))
	return writeFileAtomic(path, []byte(kc), 0o600)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
