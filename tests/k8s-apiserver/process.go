package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// signalWhenReady polls our own /readyz (verifying the serving certificate against caPEM) and
// writes readyFile once it answers 200.
func signalWhenReady(url string, caPEM []byte, readyFile string) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	for {
		resp, err := client.Get(url + "/readyz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				if err := writeFileAtomic(readyFile, []byte("ready\n"), 0o644); err != nil {
					klog.Errorf("write ready file: %v", err)
				}
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exitWhenStdinCloses calls exit once standard input reaches EOF or fails: the process that
// started us holds the other end of a pipe and lets go of it when it stops us or dies.
func exitWhenStdinCloses(exit func()) {
	go func() {
		io.Copy(io.Discard, os.Stdin)
		exit()
	}()
}

// supervise runs `supervise -- PROGRAM ARGS...`: it starts PROGRAM (etcd) and makes sure it does not
// outlive us or our parent. PROGRAM gets SIGKILL if we die (PR_SET_PDEATHSIG); when standard input
// closes, or our parent goes away, or we get SIGTERM/SIGINT, PROGRAM gets SIGTERM and, 5 s later,
// SIGKILL. Returns PROGRAM's exit status.
func supervise(args []string) int {
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: xdplb-test-apiserver supervise -- PROGRAM [ARGS...]")
		return 2
	}
	// The death signal is tied to the thread that forks: keep this goroutine on it for good.
	runtime.LockOSThread()
	ppid := os.Getppid()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "supervise: start %s: %v\n", args[0], err)
		return 1
	}
	stop := make(chan struct{}, 1)
	requestStop := func() {
		select {
		case stop <- struct{}{}:
		default:
		}
	}
	exitWhenStdinCloses(requestStop)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		requestStop()
	}()
	go func() {
		for range time.Tick(500 * time.Millisecond) {
			if os.Getppid() != ppid {
				requestStop()
				return
			}
		}
	}()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-stop:
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err = <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			err = <-done
		}
	}
	if exitErr, ok := err.(*exec.ExitError); ok {
		if code := exitErr.ExitCode(); code >= 0 {
			return code
		}
		return 1
	} else if err != nil {
		return 1
	}
	return 0
}
