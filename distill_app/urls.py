from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from . import accounts, api, pages

router = DefaultRouter()
router.register("projects", api.ProjectViewSet, basename="project")
router.register("datasets", api.DatasetViewSet, basename="dataset")
router.register("images", api.ImageViewSet, basename="image")
router.register("models", api.ModelCheckpointViewSet, basename="model")
router.register("inference-runs", api.InferenceRunViewSet, basename="inference-run")
router.register("reviews", api.ReviewViewSet, basename="review")
router.register("pseudo-label-sets", api.PseudoLabelSetViewSet, basename="pseudo-label-set")
router.register("training-runs", api.TrainingRunViewSet, basename="training-run")
router.register("evaluations", api.EvaluationViewSet, basename="evaluation")
router.register("jobs", api.JobViewSet, basename="job")

urlpatterns = [
    path("api/auth/token/", accounts.ObtainTokenView.as_view(), name="api-token"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/", include(router.urls)),
    path("login/", accounts.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", pages.projects, name="projects"),
    path("projects/<int:pk>/", pages.project, name="project"),
    path("runs/<int:pk>/review/", pages.review, name="review"),
    path("training/<int:pk>/", pages.training, name="training"),
    path("healthz", pages.healthz, name="healthz"),
]

# Errors raised before or outside the API's views (too many files, a body above the limit, an
# unknown route, a crash) answer JSON under /api/ too.
handler400 = "distill_app.exceptions.bad_request"
handler403 = "distill_app.exceptions.permission_denied"
handler404 = "distill_app.exceptions.page_not_found"
handler500 = "distill_app.exceptions.server_error"
