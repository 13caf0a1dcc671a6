// Command gopeers is the go-spiffe side of the test suite: real Go SPIFFE peers
// (go-spiffe v2.9.0, pinned in go.mod) against the sds provider, the bridge and
// Envoy. Every subcommand prints JSON lines on stdout that tests/integration/test_gopeers.py
// asserts on; an error a peer is expected to see is part of that output (with its
// gRPC code), never a crash. Exit status 2 means bad flags.
//
//	gopeers check  -addr unix:///w.sock -audience A -denied-id ID -rotations N
//	gopeers fetch  -addr unix:///w.sock                  (X.509 context or the error)
//	gopeers client -addr ... -hint H -server-id ID -url https://127.0.0.1:P/path [-n N]
//	gopeers server -addr ... -hint H -allow ID           (prints {"listening": ...})
//	gopeers app                                          (plain HTTP on loopback, for benchmarks)
//	gopeers load   -addr ... -hint H -server-id ID -url U -c 8 -duration 10s [-keep-alive]
package main

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

func emit(record map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(record)
}

// errorFields describes err as the JSON a test asserts on: the gRPC code name
// (grpc-go's, e.g. "PermissionDenied"; "OK" when err carries no status) and the message.
func errorFields(err error) map[string]any {
	if err == nil {
		return map[string]any{"code": "OK"}
	}
	st, _ := status.FromError(unwrapStatus(err))
	return map[string]any{"code": st.Code().String(), "message": st.Message(), "error": err.Error()}
}

// unwrapStatus finds a gRPC status inside go-spiffe's wrapped errors.
func unwrapStatus(err error) error {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if _, ok := status.FromError(e); ok {
			return e
		}
	}
	return err
}

func serial(cert *x509.Certificate) string {
	return hex.EncodeToString(cert.SerialNumber.Bytes())
}

func trustDomains(tds []spiffeid.TrustDomain) []string {
	names := make([]string, 0, len(tds))
	for _, td := range tds {
		names = append(names, td.Name())
	}
	sort.Strings(names)
	return names
}

func x509Domains(set *x509bundle.Set) []string {
	var tds []spiffeid.TrustDomain
	for _, b := range set.Bundles() {
		tds = append(tds, b.TrustDomain())
	}
	return trustDomains(tds)
}

func jwtDomains(set *jwtbundle.Set) []string {
	var tds []spiffeid.TrustDomain
	for _, b := range set.Bundles() {
		tds = append(tds, b.TrustDomain())
	}
	return trustDomains(tds)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gopeers check|fetch|client|server [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "check":
		err = check(os.Args[2:])
	case "fetch":
		err = fetch(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	case "server":
		err = server(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "app":
		err = app(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gopeers %s: %v\n", os.Args[1], err)
		os.Exit(2)
	}
}

// ---------------------------------------------------------------------------- check

func check(args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	addr := fs.String("addr", "", "Workload API address (unix:///path)")
	audience := fs.String("audience", "payments", "JWT-SVID audience")
	deniedID := fs.String("denied-id", "", "a SPIFFE ID this caller is not entitled to")
	rotations := fs.Int("rotations", 2, "rotations to watch (0: skip)")
	rotationTimeout := fs.Duration("rotation-timeout", 90*time.Second, "")
	witTimeout := fs.Duration("wit-timeout", 15*time.Second, "how long the WIT watch may retry")
	sections := fs.String("sections", "x509,jwt,wit,unknown_method,rotation", "checks to run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	want := map[string]bool{}
	for _, name := range strings.Split(*sections, ",") {
		want[name] = true
	}
	ctx := context.Background()
	wl, err := workloadapi.New(ctx, workloadapi.WithAddr(*addr))
	if err != nil {
		return err
	}
	defer wl.Close()

	if want["x509"] {
		checkX509(ctx, wl)
	}
	if want["jwt"] {
		checkJWT(ctx, wl, *audience, *deniedID)
	}
	if want["wit"] {
		checkWIT(ctx, wl, *witTimeout)
	}
	if want["unknown_method"] {
		checkUnknownMethod(ctx, *addr)
	}
	if want["rotation"] && *rotations > 0 {
		checkRotation(ctx, wl, *rotations, *rotationTimeout)
	}
	return nil
}

func checkX509(ctx context.Context, wl *workloadapi.Client) {
	record := map[string]any{"check": "x509"}
	defer emit(record)
	x509ctx, err := wl.FetchX509Context(ctx)
	if err != nil {
		record["fetch"] = errorFields(err)
		return
	}
	var ids, hints, verified []string
	for _, svid := range x509ctx.SVIDs {
		ids = append(ids, svid.ID.String())
		hints = append(hints, svid.Hint)
		id, chains, err := x509svid.Verify(svid.Certificates, x509ctx.Bundles)
		if err != nil {
			record["verify_error"] = err.Error()
			continue
		}
		if len(chains) > 0 && id == svid.ID {
			verified = append(verified, id.String())
		}
	}
	record["spiffe_ids"] = ids
	record["hints"] = hints
	record["verified_ids"] = verified
	record["context_trust_domains"] = x509Domains(x509ctx.Bundles)
	record["has_private_key"] = len(x509ctx.SVIDs) > 0 && x509ctx.SVIDs[0].PrivateKey != nil

	bundles, err := wl.FetchX509Bundles(ctx)
	if err != nil {
		record["bundles"] = errorFields(err)
		return
	}
	record["bundle_trust_domains"] = x509Domains(bundles)
	// The default SVID verifies against the bundle set from FetchX509Bundles too.
	if len(x509ctx.SVIDs) > 0 {
		_, _, err = x509svid.Verify(x509ctx.SVIDs[0].Certificates, bundles)
		record["verifies_with_fetched_bundles"] = err == nil
	}
}

func checkJWT(ctx context.Context, wl *workloadapi.Client, audience, deniedID string) {
	record := map[string]any{"check": "jwt"}
	defer emit(record)
	bundles, err := wl.FetchJWTBundles(ctx)
	if err != nil {
		record["bundles"] = errorFields(err)
		return
	}
	record["bundle_trust_domains"] = jwtDomains(bundles)
	svid, err := wl.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		record["fetch"] = errorFields(err)
		return
	}
	token := svid.Marshal()
	local, err := jwtsvid.ParseAndValidate(token, bundles, []string{audience})
	if err != nil {
		record["local_error"] = err.Error()
	} else {
		record["local_subject"] = local.ID.String()
		record["local_audience"] = local.Audience
		record["local_expiry_in_future"] = local.Expiry.After(time.Now())
	}
	_, err = jwtsvid.ParseAndValidate(token, bundles, []string{"someone-else"})
	record["wrong_audience_error"] = fmt.Sprint(err)
	server, err := wl.ValidateJWTSVID(ctx, token, audience)
	if err != nil {
		record["server"] = errorFields(err)
	} else {
		record["server_subject"] = server.ID.String()
	}
	_, err = wl.ValidateJWTSVID(ctx, token, "someone-else")
	record["server_wrong_audience"] = errorFields(err)
	if deniedID != "" {
		id, err := spiffeid.FromString(deniedID)
		if err == nil {
			_, err = wl.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience, Subject: id})
		}
		record["denied_subject"] = errorFields(err)
	}
}

type witWatcher struct{ updates int }

func (w *witWatcher) OnWITSVIDsUpdate([]*witsvid.SVID) { w.updates++ }
func (w *witWatcher) OnWITSVIDsWatchError(error)       {}

// checkWIT calls the WIT-SVID profile go-spiffe v2.9 speaks and our provider does
// not implement: the watch must stop on Unimplemented (Workload API standard,
// WIT-SVID profile) instead of retrying until its deadline.
func checkWIT(ctx context.Context, wl *workloadapi.Client, timeout time.Duration) {
	record := map[string]any{"check": "wit"}
	defer emit(record)
	_, err := wl.FetchWITSVIDs(ctx, "")
	record["fetch"] = errorFields(err)
	_, err = wl.FetchWITBundles(ctx)
	record["fetch_bundles"] = errorFields(err)
	watchCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	watcher := &witWatcher{}
	err = wl.WatchWITSVIDs(watchCtx, watcher, "")
	record["watch"] = errorFields(err)
	record["watch_stopped_by_server"] = watchCtx.Err() == nil
	record["watch_updates"] = watcher.updates
}

// checkUnknownMethod sends a raw unary call for a method the Workload API does not have.
func checkUnknownMethod(ctx context.Context, addr string) {
	record := map[string]any{"check": "unknown_method"}
	defer emit(record)
	target := addr
	if strings.HasPrefix(target, "unix:///") {
		target = "unix:" + strings.TrimPrefix(target, "unix://")
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		record["dial"] = err.Error()
		return
	}
	defer conn.Close()
	callCtx, cancel := context.WithTimeout(
		metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), 10*time.Second)
	defer cancel()
	err = conn.Invoke(callCtx, "/SpiffeWorkloadAPI/NoSuchMethod",
		&workload.X509SVIDRequest{}, &workload.X509SVIDResponse{})
	record["call"] = errorFields(err)
}

type rotationWatcher struct {
	mu      sync.Mutex
	serials []string
	valid   []bool
	errs    []string
	done    chan struct{}
	want    int
}

func (w *rotationWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(c.SVIDs) == 0 {
		return
	}
	svid := c.DefaultSVID()
	s := serial(svid.Certificates[0])
	if len(w.serials) > 0 && w.serials[len(w.serials)-1] == s {
		return
	}
	_, _, err := x509svid.Verify(svid.Certificates, c.Bundles)
	w.serials = append(w.serials, s)
	w.valid = append(w.valid, err == nil)
	if len(w.serials) == w.want {
		close(w.done)
	}
}

func (w *rotationWatcher) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if status.Code(unwrapStatus(err)).String() != "Canceled" {
		w.errs = append(w.errs, err.Error())
	}
}

// checkRotation keeps one FetchX509SVID stream open until the default SVID has
// been replaced `rotations` times; every update must verify against its bundles.
func checkRotation(ctx context.Context, wl *workloadapi.Client, rotations int, timeout time.Duration) {
	record := map[string]any{"check": "rotation"}
	defer emit(record)
	watcher := &rotationWatcher{done: make(chan struct{}), want: rotations + 1, errs: []string{}}
	watchCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	result := make(chan error, 1)
	go func() { result <- wl.WatchX509Context(watchCtx, watcher) }()
	select {
	case <-watcher.done:
		record["completed"] = true
	case <-watchCtx.Done():
		record["completed"] = false
	}
	cancel()
	<-result
	watcher.mu.Lock()
	defer watcher.mu.Unlock()
	record["serials"] = watcher.serials
	record["verified"] = watcher.valid
	record["watch_errors"] = watcher.errs
}

// ---------------------------------------------------------------------------- fetch

// fetch prints the X.509 context's IDs or the error; run as another uid it shows what a
// caller matching no rule is told.
func fetch(args []string) error {
	fs := flag.NewFlagSet("fetch", flag.ContinueOnError)
	addr := fs.String("addr", "", "Workload API address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	record := map[string]any{"check": "fetch", "uid": os.Getuid(), "pid": os.Getpid()}
	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(*addr))
	if err != nil {
		record["result"] = errorFields(err)
	} else {
		var ids []string
		for _, svid := range x509ctx.SVIDs {
			ids = append(ids, svid.ID.String())
		}
		record["result"] = errorFields(nil)
		record["spiffe_ids"] = ids
	}
	_, err = workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "any"}, workloadapi.WithAddr(*addr))
	record["jwt"] = errorFields(err)
	emit(record)
	return nil
}

// ---------------------------------------------------------------------------- sources

// source is an X509Source whose default SVID is the one with `hint` (first SVID when empty).
func source(ctx context.Context, addr, hint string) (*workloadapi.X509Source, error) {
	picker := func(svids []*x509svid.SVID) *x509svid.SVID {
		for _, svid := range svids {
			if hint == "" || svid.Hint == hint {
				return svid
			}
		}
		return svids[0]
	}
	return workloadapi.NewX509Source(ctx,
		workloadapi.WithClientOptions(workloadapi.WithAddr(addr)),
		workloadapi.WithDefaultX509SVIDPicker(picker))
}

func authorizer(ids []string) (tlsconfig.Authorizer, error) {
	var parsed []spiffeid.ID
	for _, raw := range ids {
		id, err := spiffeid.FromString(raw)
		if err != nil {
			return nil, err
		}
		parsed = append(parsed, id)
	}
	return tlsconfig.AuthorizeOneOf(parsed...), nil
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

// mtlsPeer is what client, server and load share: -addr, the SVID `-hint` to
// present, and the repeatable flag naming the SPIFFE IDs the other side may have.
type mtlsPeer struct {
	addr, hint *string
	ids        multi
}

func mtlsFlags(fs *flag.FlagSet, idsFlag, idsUsage string) *mtlsPeer {
	p := &mtlsPeer{
		addr: fs.String("addr", "", "Workload API address"),
		hint: fs.String("hint", "", "hint of the SVID to present"),
	}
	fs.Var(&p.ids, idsFlag, idsUsage)
	return p
}

// open returns the X.509 source (the caller closes it) and the authorizer for the IDs.
func (p *mtlsPeer) open(ctx context.Context) (*workloadapi.X509Source, tlsconfig.Authorizer, error) {
	src, err := source(ctx, *p.addr, *p.hint)
	if err != nil {
		return nil, nil, err
	}
	authz, err := authorizer(p.ids)
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return src, authz, nil
}

// ---------------------------------------------------------------------------- client

// client sends -n GETs to -url over spiffetls (mTLS with its SVID `-hint`), authorizing
// the server as one of -server-id; one JSON line per request.
func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	peer := mtlsFlags(fs, "server-id", "SPIFFE ID the server must present (repeatable)")
	url := fs.String("url", "", "https://127.0.0.1:PORT/path")
	n := fs.Int("n", 1, "requests")
	keepAlive := fs.Bool("keep-alive", false, "reuse one connection")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	src, authz, err := peer.open(ctx)
	if err != nil {
		return err
	}
	defer src.Close()
	own, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	transport := &http.Transport{
		DisableKeepAlives: !*keepAlive,
		DialTLSContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			return spiffetls.DialWithMode(ctx, network, address,
				spiffetls.MTLSClientWithRawConfig(authz, src, src))
		},
	}
	defer transport.CloseIdleConnections()
	httpClient := &http.Client{Transport: transport, Timeout: 15 * time.Second}
	for i := 0; i < *n; i++ {
		record := map[string]any{"check": "client", "own_id": own.ID.String()}
		resp, err := httpClient.Get(*url)
		if err != nil {
			record["error"] = err.Error()
		} else {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			record["status"] = resp.StatusCode
			record["body"] = string(body)
		}
		emit(record)
	}
	return nil
}

// ---------------------------------------------------------------------------- server

type connKey struct{}

// server listens on loopback with spiffetls (mTLS with its SVID `-hint`, callers
// authorized as one of -allow) and answers each GET with the caller's SPIFFE ID.
func server(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	peer := mtlsFlags(fs, "allow", "caller SPIFFE ID admitted (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx := context.Background()
	src, authz, err := peer.open(ctx)
	if err != nil {
		return err
	}
	defer src.Close()
	own, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithRawConfig(authz, src, src))
	if err != nil {
		return err
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _ := r.Context().Value(connKey{}).(net.Conn)
		peer, err := spiffetls.PeerIDFromConn(conn)
		body := map[string]any{"path": r.URL.Path, "server_id": own.ID.String()}
		if err != nil {
			body["peer_error"] = err.Error()
		} else {
			body["peer_id"] = peer.String()
		}
		w.Header().Set("content-type", "application/json")
		_ = json.NewEncoder(w).Encode(body)
	})
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	emit(map[string]any{"check": "server", "listening": listener.Addr().String(), "own_id": own.ID.String()})
	return srv.Serve(listener)
}

// ---------------------------------------------------------------------------- load

// load runs -c workers sending GETs to -url for -duration (mTLS with the SVID `-hint`,
// go-spiffe's tlsconfig on net/http), then prints one summary line: requests,
// failures, latency percentiles, and the distinct server leaf serials seen in order.
func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	peer := mtlsFlags(fs, "server-id", "SPIFFE ID the server must present (repeatable)")
	url := fs.String("url", "", "https://127.0.0.1:PORT/path")
	workers := fs.Int("c", 1, "concurrent workers")
	duration := fs.Duration("duration", 5*time.Second, "")
	keepAlive := fs.Bool("keep-alive", false, "one reused connection per worker")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx := context.Background()
	src, authz, err := peer.open(ctx)
	if err != nil {
		return err
	}
	defer src.Close()
	var mu sync.Mutex
	var latencies []float64
	serials := []string{}
	errs := []string{}
	failures := 0
	deadline := time.Now().Add(*duration)
	var wg sync.WaitGroup
	started := time.Now()
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			transport := &http.Transport{
				DisableKeepAlives:   !*keepAlive,
				TLSClientConfig:     tlsconfig.MTLSClientConfig(src, src, authz),
				MaxIdleConnsPerHost: 1,
			}
			defer transport.CloseIdleConnections()
			httpClient := &http.Client{Transport: transport, Timeout: 10 * time.Second}
			var mine []float64
			for time.Now().Before(deadline) {
				t0 := time.Now()
				resp, err := httpClient.Get(*url)
				var leaf string
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("HTTP %d", resp.StatusCode)
					}
					if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
						leaf = serial(resp.TLS.PeerCertificates[0])
					}
				}
				elapsed := time.Since(t0)
				mu.Lock()
				if err != nil {
					failures++
					if len(errs) < 5 {
						errs = append(errs, err.Error())
					}
				} else {
					mine = append(mine, float64(elapsed.Microseconds())/1000)
					if leaf != "" && (len(serials) == 0 || serials[len(serials)-1] != leaf) {
						serials = append(serials, leaf)
					}
				}
				mu.Unlock()
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	wall := time.Since(started).Seconds()
	sort.Float64s(latencies)
	pct := func(q float64) float64 {
		if len(latencies) == 0 {
			return 0
		}
		return latencies[int(q*float64(len(latencies)-1))]
	}
	emit(map[string]any{
		"check": "load", "requests": len(latencies), "failures": failures, "errors": errs,
		"p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
		"rps": float64(len(latencies)) / wall, "serials": serials,
		"workers": *workers, "keep_alive": *keepAlive,
	})
	return nil
}

// ---------------------------------------------------------------------------- app

// app is the plain-HTTP application behind the mTLS fronts in bench/peers.py: it
// listens on a kernel-chosen loopback port and answers every request with a short body.
func app(args []string) error {
	fs := flag.NewFlagSet("app", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	body := []byte("hello from app\n")
	handler := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("content-type", "text/plain")
		_, _ = w.Write(body)
	})
	emit(map[string]any{"check": "app", "listening": listener.Addr().String()})
	return (&http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}).Serve(listener)
}
