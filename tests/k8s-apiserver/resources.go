package main

import (
	"context"
	"fmt"
	"reflect"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	eventsv1 "k8s.io/api/events/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/names"
	"sigs.k8s.io/structured-merge-diff/v6/fieldpath"
)

// resource describes one served resource. Everything about it is generic but for these flags.
type resource struct {
	plural, singular, kind string
	namespaced             bool
	obj, list              func() runtime.Object

	status              bool // has a /status subresource; the main resource ignores status changes
	clearStatusOnCreate bool // like kube-apiserver: status given on create is dropped
	generation          bool // metadata.generation starts at 1 and is bumped when spec changes
	createOnUpdate      bool // PUT of a missing object creates it (kube-apiserver does for these)
	shortNames          []string
	categories          []string
	// fields returns selectable fields beyond metadata.name and metadata.namespace.
	fields func(obj runtime.Object) fields.Set
}

type apiGroup struct {
	gv          schema.GroupVersion
	addToScheme func(*runtime.Scheme) error
	resources   []*resource
}

var apiGroups = []apiGroup{
	{gv: corev1.SchemeGroupVersion, addToScheme: corev1.AddToScheme, resources: []*resource{
		{plural: "namespaces", singular: "namespace", kind: "Namespace", obj: newT[corev1.Namespace], list: newT[corev1.NamespaceList],
			status: true, clearStatusOnCreate: true, shortNames: []string{"ns"}},
		{plural: "services", singular: "service", kind: "Service", namespaced: true, obj: newT[corev1.Service], list: newT[corev1.ServiceList],
			status: true, clearStatusOnCreate: true, shortNames: []string{"svc"}, categories: []string{"all"},
			fields: func(o runtime.Object) fields.Set {
				s := o.(*corev1.Service)
				return fields.Set{"spec.clusterIP": s.Spec.ClusterIP, "spec.type": string(s.Spec.Type)}
			}},
		{plural: "endpoints", singular: "endpoints", kind: "Endpoints", namespaced: true, obj: newT[corev1.Endpoints], list: newT[corev1.EndpointsList],
			createOnUpdate: true, shortNames: []string{"ep"}},
		{plural: "configmaps", singular: "configmap", kind: "ConfigMap", namespaced: true, obj: newT[corev1.ConfigMap], list: newT[corev1.ConfigMapList],
			shortNames: []string{"cm"}},
		{plural: "secrets", singular: "secret", kind: "Secret", namespaced: true, obj: newT[corev1.Secret], list: newT[corev1.SecretList],
			fields: func(o runtime.Object) fields.Set { return fields.Set{"type": string(o.(*corev1.Secret).Type)} }},
		{plural: "serviceaccounts", singular: "serviceaccount", kind: "ServiceAccount", namespaced: true, obj: newT[corev1.ServiceAccount], list: newT[corev1.ServiceAccountList],
			shortNames: []string{"sa"}},
		{plural: "events", singular: "event", kind: "Event", namespaced: true, obj: newT[corev1.Event], list: newT[corev1.EventList],
			createOnUpdate: true, shortNames: []string{"ev"},
			fields: func(o runtime.Object) fields.Set {
				e := o.(*corev1.Event)
				return fields.Set{
					"involvedObject.kind": e.InvolvedObject.Kind, "involvedObject.namespace": e.InvolvedObject.Namespace,
					"involvedObject.name": e.InvolvedObject.Name, "involvedObject.uid": string(e.InvolvedObject.UID),
					"involvedObject.apiVersion": e.InvolvedObject.APIVersion, "involvedObject.resourceVersion": e.InvolvedObject.ResourceVersion,
					"involvedObject.fieldPath": e.InvolvedObject.FieldPath, "reason": e.Reason, "reportingComponent": e.ReportingController,
					"source": e.Source.Component, "type": e.Type,
				}
			}},
		{plural: "nodes", singular: "node", kind: "Node", obj: newT[corev1.Node], list: newT[corev1.NodeList],
			status: true, shortNames: []string{"no"},
			fields: func(o runtime.Object) fields.Set {
				return fields.Set{"spec.unschedulable": fmt.Sprint(o.(*corev1.Node).Spec.Unschedulable)}
			}},
		{plural: "pods", singular: "pod", kind: "Pod", namespaced: true, obj: newT[corev1.Pod], list: newT[corev1.PodList],
			status: true, clearStatusOnCreate: true, shortNames: []string{"po"}, categories: []string{"all"},
			fields: func(o runtime.Object) fields.Set {
				p := o.(*corev1.Pod)
				return fields.Set{"spec.nodeName": p.Spec.NodeName, "spec.serviceAccountName": p.Spec.ServiceAccountName,
					"status.phase": string(p.Status.Phase), "status.podIP": p.Status.PodIP}
			}},
	}},
	{gv: discoveryv1.SchemeGroupVersion, addToScheme: discoveryv1.AddToScheme, resources: []*resource{
		{plural: "endpointslices", singular: "endpointslice", kind: "EndpointSlice", namespaced: true, obj: newT[discoveryv1.EndpointSlice], list: newT[discoveryv1.EndpointSliceList]},
	}},
	{gv: appsv1.SchemeGroupVersion, addToScheme: appsv1.AddToScheme, resources: []*resource{
		{plural: "daemonsets", singular: "daemonset", kind: "DaemonSet", namespaced: true, obj: newT[appsv1.DaemonSet], list: newT[appsv1.DaemonSetList],
			status: true, clearStatusOnCreate: true, generation: true, shortNames: []string{"ds"}, categories: []string{"all"}},
		{plural: "deployments", singular: "deployment", kind: "Deployment", namespaced: true, obj: newT[appsv1.Deployment], list: newT[appsv1.DeploymentList],
			status: true, clearStatusOnCreate: true, generation: true, shortNames: []string{"deploy"}, categories: []string{"all"}},
	}},
	{gv: rbacv1.SchemeGroupVersion, addToScheme: rbacv1.AddToScheme, resources: []*resource{
		{plural: "clusterroles", singular: "clusterrole", kind: "ClusterRole", obj: newT[rbacv1.ClusterRole], list: newT[rbacv1.ClusterRoleList]},
		{plural: "clusterrolebindings", singular: "clusterrolebinding", kind: "ClusterRoleBinding", obj: newT[rbacv1.ClusterRoleBinding], list: newT[rbacv1.ClusterRoleBindingList]},
		{plural: "roles", singular: "role", kind: "Role", namespaced: true, obj: newT[rbacv1.Role], list: newT[rbacv1.RoleList]},
		{plural: "rolebindings", singular: "rolebinding", kind: "RoleBinding", namespaced: true, obj: newT[rbacv1.RoleBinding], list: newT[rbacv1.RoleBindingList]},
	}},
	{gv: eventsv1.SchemeGroupVersion, addToScheme: eventsv1.AddToScheme, resources: []*resource{
		// Stored apart from core v1 events (no conversion between the two here).
		{plural: "events", singular: "event", kind: "Event", namespaced: true, obj: newT[eventsv1.Event], list: newT[eventsv1.EventList],
			createOnUpdate: true, shortNames: []string{"ev"}},
	}},
	{gv: coordinationv1.SchemeGroupVersion, addToScheme: coordinationv1.AddToScheme, resources: []*resource{
		{plural: "leases", singular: "lease", kind: "Lease", namespaced: true, obj: newT[coordinationv1.Lease], list: newT[coordinationv1.LeaseList]},
	}},
}

// newT returns a new *T as a runtime.Object.
func newT[T any]() runtime.Object {
	return any(new(T)).(runtime.Object)
}

// newSchemes returns the serving scheme, in which every external type of the served groups is
// also registered as its group's internal version (so the library never needs conversions), and
// a scheme with the external types only, for naming OpenAPI definitions.
func newSchemes() (*runtime.Scheme, *runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	external := runtime.NewScheme()
	for _, g := range apiGroups {
		if err := g.addToScheme(scheme); err != nil {
			return nil, nil, err
		}
		if err := g.addToScheme(external); err != nil {
			return nil, nil, err
		}
		pkg := reflect.TypeOf(g.resources[0].obj()).Elem().PkgPath()
		internal := schema.GroupVersion{Group: g.gv.Group, Version: runtime.APIVersionInternal}
		for kind, t := range external.KnownTypes(g.gv) {
			if t.PkgPath() != pkg { // ListOptions, WatchEvent, ... from meta/v1
				continue
			}
			scheme.AddKnownTypeWithName(internal.WithKind(kind), reflect.New(t).Interface().(runtime.Object))
		}
		if err := scheme.SetVersionPriority(g.gv); err != nil {
			return nil, nil, err
		}
		for _, r := range g.resources {
			if err := addFieldLabels(scheme, g.gv.WithKind(r.kind), r); err != nil {
				return nil, nil, err
			}
		}
	}
	return scheme, external, nil
}

func addFieldLabels(scheme *runtime.Scheme, gvk schema.GroupVersionKind, r *resource) error {
	supported := map[string]bool{"metadata.name": true}
	if r.namespaced {
		supported["metadata.namespace"] = true
	}
	if r.fields != nil {
		for k := range r.fields(r.obj()) {
			supported[k] = true
		}
	}
	return scheme.AddFieldLabelConversionFunc(gvk, func(label, value string) (string, string, error) {
		if supported[label] {
			return label, value, nil
		}
		return "", "", fmt.Errorf("field label not supported: %s", label)
	})
}

func attrFunc(r *resource) storage.AttrFunc {
	return func(obj runtime.Object) (labels.Set, fields.Set, error) {
		m, err := meta.Accessor(obj)
		if err != nil {
			return nil, nil, err
		}
		fs := fields.Set{"metadata.name": m.GetName()}
		if r.namespaced {
			fs["metadata.namespace"] = m.GetNamespace()
		}
		if r.fields != nil {
			for k, v := range r.fields(obj) {
				fs[k] = v
			}
		}
		return labels.Set(m.GetLabels()), fs, nil
	}
}

// newStorage makes the etcd-backed storage for r, and for its status subresource if it has one.
func newStorage(scheme *runtime.Scheme, gv schema.GroupVersion, r *resource, getter generic.RESTOptionsGetter) (rest.Storage, rest.Storage, error) {
	gr := schema.GroupResource{Group: gv.Group, Resource: r.plural}
	st := strategy{ObjectTyper: scheme, NameGenerator: names.SimpleNameGenerator, r: r, apiVersion: fieldpath.APIVersion(gv.String())}
	store := &genericregistry.Store{
		NewFunc:                   r.obj,
		NewListFunc:               r.list,
		DefaultQualifiedResource:  gr,
		SingularQualifiedResource: schema.GroupResource{Group: gv.Group, Resource: r.singular},
		CreateStrategy:            st,
		UpdateStrategy:            st,
		DeleteStrategy:            st,
		ResetFieldsStrategy:       st,
		TableConvertor:            rest.NewDefaultTableConvertor(gr),
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: getter, AttrFunc: attrFunc(r)}); err != nil {
		return nil, nil, err
	}
	main := &mainREST{Store: store, r: r}
	if !r.status {
		return main, nil, nil
	}
	statusStore := *store
	ss := statusStrategy{st}
	statusStore.UpdateStrategy = ss
	statusStore.ResetFieldsStrategy = ss
	return main, &statusREST{store: &statusStore}, nil
}

// mainREST is the storage of a resource: the generic store plus short names and categories for
// discovery (kubectl get svc, kubectl get all).
type mainREST struct {
	*genericregistry.Store
	r *resource
}

func (m *mainREST) ShortNames() []string { return m.r.shortNames }
func (m *mainREST) Categories() []string { return m.r.categories }

// statusREST serves the status subresource: get, update and patch.
type statusREST struct {
	store *genericregistry.Store
}

func (s *statusREST) New() runtime.Object { return s.store.New() }
func (s *statusREST) Destroy()            {}
func (s *statusREST) Get(ctx context.Context, name string, options *metav1.GetOptions) (runtime.Object, error) {
	return s.store.Get(ctx, name, options)
}
func (s *statusREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo, createValidation rest.ValidateObjectFunc, updateValidation rest.ValidateObjectUpdateFunc, forceAllowCreate bool, options *metav1.UpdateOptions) (runtime.Object, bool, error) {
	// A status update never creates the object.
	return s.store.Update(ctx, name, objInfo, createValidation, updateValidation, false, options)
}
func (s *statusREST) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	return s.store.GetResetFields()
}
func (s *statusREST) ConvertToTable(ctx context.Context, object runtime.Object, tableOptions runtime.Object) (*metav1.Table, error) {
	return s.store.ConvertToTable(ctx, object, tableOptions)
}

// strategy is the one create/update/delete strategy shared by all resources: no validation, the
// few behaviours selected by the resource's flags, and defaults.go's defaulting.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	r          *resource
	apiVersion fieldpath.APIVersion
}

func (s strategy) NamespaceScoped() bool          { return s.r.namespaced }
func (s strategy) AllowCreateOnUpdate() bool      { return s.r.createOnUpdate }
func (s strategy) AllowUnconditionalUpdate() bool { return true }
func (s strategy) Canonicalize(runtime.Object)    {}
func (s strategy) Validate(context.Context, runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) ValidateUpdate(context.Context, runtime.Object, runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) WarningsOnCreate(context.Context, runtime.Object) []string { return nil }
func (s strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func (s strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if s.r.status && s.r.clearStatusOnCreate {
		v := structField(obj, "Status")
		v.Set(reflect.Zero(v.Type()))
	}
	if ns, ok := obj.(*corev1.Namespace); ok {
		ns.Status.Phase = corev1.NamespaceActive
	}
	if s.r.generation {
		if m, err := meta.Accessor(obj); err == nil {
			m.SetGeneration(1)
		}
	}
	applyDefaults(obj)
}

func (s strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	if s.r.status {
		structField(obj, "Status").Set(structField(old, "Status"))
	}
	if s.r.generation {
		m, err1 := meta.Accessor(obj)
		o, err2 := meta.Accessor(old)
		if err1 == nil && err2 == nil {
			gen := o.GetGeneration()
			if !equality.Semantic.DeepEqual(structField(obj, "Spec").Interface(), structField(old, "Spec").Interface()) {
				gen++
			}
			m.SetGeneration(gen)
		}
	}
	applyDefaults(obj)
}

func (s strategy) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	if !s.r.status {
		return nil
	}
	return map[fieldpath.APIVersion]*fieldpath.Set{s.apiVersion: fieldpath.NewSet(fieldpath.MakePathOrDie("status"))}
}

// statusStrategy is used for updates through /status: only status changes are kept.
type statusStrategy struct{ strategy }

func (s statusStrategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	if v := structField(obj, "Spec"); v.IsValid() {
		v.Set(structField(old, "Spec"))
	}
	if m, err := meta.Accessor(obj); err == nil {
		if o, err := meta.Accessor(old); err == nil {
			metav1.ResetObjectMetaForStatus(m, o)
		}
	}
}

func (s statusStrategy) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	return map[fieldpath.APIVersion]*fieldpath.Set{s.apiVersion: fieldpath.NewSet(fieldpath.MakePathOrDie("spec"))}
}

// structField returns the settable field name of the struct obj points to (invalid if absent).
func structField(obj runtime.Object, name string) reflect.Value {
	return reflect.ValueOf(obj).Elem().FieldByName(name)
}
